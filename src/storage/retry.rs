//! Retrying transient store failures with backoff, inside a time budget.
//!
//! Cloud clients already retry single HTTP requests; this layer sits above them and covers what they
//! cannot: a response body cut off half-way, a request that never answers, a store that is down for a
//! few seconds. Only failures that may go away by themselves are retried (`object_store::Error::Generic`,
//! which is what network errors, timeouts and 5xx answers become, and task join errors). Answers that
//! will not change (not found, already exists, permission denied, bad path, not implemented) return at
//! once. Every retry is logged with the key and the error.
//!
//! Retrying never turns a failure into a false success: a conditional create that was applied but whose
//! answer was lost comes back as "already exists", and the repository then compares the stored bytes
//! before calling it done.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Environment variable that overrides the retry budget (`30s`, `2m`, `0` for no retries).
pub const BUDGET_ENV: &str = "PITR_RETRY_BUDGET";

/// How long and how often to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No new attempt starts after this much time since the first one.
    pub budget: Duration,
    /// One attempt that takes longer than this is abandoned and counted as a transient failure.
    pub attempt_timeout: Duration,
    /// Wait before the second attempt; doubled each time up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            budget: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(300),
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all (local directories: their errors do not go away by waiting).
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            budget: Duration::ZERO,
            ..RetryPolicy::default()
        }
    }

    /// The default policy with the budget from `PITR_RETRY_BUDGET` when set.
    ///
    /// # Errors
    /// When the variable is set but is not a duration.
    pub fn from_env() -> Result<RetryPolicy, String> {
        let mut p = RetryPolicy::default();
        if let Some(v) = std::env::var_os(BUDGET_ENV) {
            let v = v.to_string_lossy();
            p.budget = if v.trim() == "0" {
                Duration::ZERO
            } else {
                humantime::parse_duration(v.trim())
                    .map_err(|e| format!("{v:?} is not a duration ({e})"))?
            };
        }
        Ok(p)
    }
}

/// Whether a store error may go away if the operation is tried again: network errors, timeouts,
/// throttling and 5xx answers. A 4xx answer (missing bucket, no or wrong credentials, permission
/// denied) will be the same next time, and so is a request for credentials from a cloud instance's
/// metadata service on a machine that has none: those fail at once.
pub fn is_transient(e: &object_store::Error) -> bool {
    match e {
        // An object that does not open, or a key problem, is the same next time.
        object_store::Error::Generic { source, .. }
            if source.downcast_ref::<super::sealed::SealError>().is_some() =>
        {
            false
        }
        object_store::Error::Generic { source, .. } => {
            !is_permanent_answer(&chain_text(source.as_ref()))
        }
        object_store::Error::JoinError { .. } => true,
        _ => false,
    }
}

/// The messages of `e` and all its sources, joined.
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Whether a store's error text is an answer that will not change: an HTTP 4xx status other than
/// 408 (timeout) and 429 (throttling), or the instance metadata service (where cloud clients look
/// for credentials when none are in the environment).
pub fn is_permanent_answer(text: &str) -> bool {
    let status = |first: char| {
        text.match_indices("status code: ").any(|(i, m)| {
            let code = text[i + m.len()..].get(..3).unwrap_or("");
            code.starts_with(first) && code != "408" && code != "429"
        })
    };
    let metadata = text.contains("169.254.169.254") || text.contains("metadata.google.internal");
    status('4') || (metadata && !status('5'))
}

/// Whether a store's error text says the credentials are missing, wrong or not allowed.
pub fn is_credentials_answer(text: &str) -> bool {
    text.contains("169.254.169.254")
        || text.contains("metadata.google.internal")
        || text.contains("status code: 401")
        || text.contains("status code: 403")
        || text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.to_ascii_lowercase().contains("credential")
}

/// Run `attempt` until it succeeds, fails for good, or the budget is spent. `what` names the
/// operation and key for the log.
///
/// # Errors
/// The last attempt's error.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    what: &(dyn Fn() -> String + Sync),
    mut attempt: F,
) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let start = Instant::now();
    let mut backoff = policy.first_backoff;
    for n in 1u32.. {
        let result = match tokio::time::timeout(policy.attempt_timeout, attempt()).await {
            Ok(r) => r,
            Err(_) => Err(object_store::Error::Generic {
                store: "pitr",
                source: format!("no answer within {:?}", policy.attempt_timeout).into(),
            }),
        };
        match result {
            Err(e) if is_transient(&e) && start.elapsed() + backoff < policy.budget => {
                let wait = jittered(backoff);
                tracing::warn!(
                    "{}: attempt {n} failed ({e}); retrying in {} ms",
                    what(),
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(policy.max_backoff);
            }
            r => return r,
        }
    }
    unreachable!("the attempt counter cannot run out")
}

/// `d` plus up to a quarter of it, so that many waiting clients do not retry in lockstep.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "connection reset by peer".into(),
        }
    }

    fn quick(budget_ms: u64) -> RetryPolicy {
        RetryPolicy {
            budget: Duration::from_millis(budget_ms),
            attempt_timeout: Duration::from_millis(200),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[test]
    fn answers_that_will_not_change_are_permanent() {
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        for permanent in [
            "Error performing list request: Server returned non-2xx status code: 404 Not Found: <Code>NoSuchBucket</Code>",
            "Server returned non-2xx status code: 403 Forbidden: InvalidAccessKeyId",
            "Error performing PUT http://169.254.169.254/latest/api/token in 4ms - error sending request",
        ] {
            assert!(!is_transient(&generic(permanent)), "{permanent}");
        }
        for transient in [
            "connection reset by peer",
            "Server returned non-2xx status code: 503 Service Unavailable",
            "Server returned non-2xx status code: 429 Too Many Requests",
            "Server returned non-2xx status code: 408 Request Timeout",
        ] {
            assert!(is_transient(&generic(transient)), "{transient}");
        }
        assert!(is_credentials_answer("status code: 403 Forbidden"));
        assert!(!is_credentials_answer("status code: 404 Not Found"));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_permanent_ones_are_not() {
        let calls = AtomicU32::new(0);
        let r = retry(&quick(5_000), &|| "read k".into(), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(generic()),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&quick(5_000), &|| "read k".into(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(object_store::Error::NotFound {
                path: "k".into(),
                source: "gone".into(),
            })
        })
        .await;
        assert!(matches!(r, Err(object_store::Error::NotFound { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_ends_retries_and_a_stall_counts_as_a_failure() {
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&quick(300), &|| "write k".into(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(generic())
        })
        .await;
        assert!(r.is_err());
        assert!(calls.load(Ordering::SeqCst) > 2);
        // Tokio's clock, paused: no attempt starts once the budget is spent.
        let p = quick(300);
        assert!(
            start.elapsed() <= p.budget + p.max_backoff,
            "{:?}",
            start.elapsed()
        );

        // The first attempt never answers; the second does.
        let calls = AtomicU32::new(0);
        let r = retry(&quick(5_000), &|| "write k".into(), || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            Ok(1)
        })
        .await;
        assert_eq!(r.unwrap(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // No budget: one attempt only.
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&RetryPolicy::none(), &|| "k".into(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(generic())
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
