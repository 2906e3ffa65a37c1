//! Units for messages.

/// Bytes as MiB, for messages and tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}
