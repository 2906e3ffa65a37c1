//! The CPU a process shares between its streams.

/// How many pieces may be compressed or decompressed at once in one process: one per CPU (at least
/// two). `--jobs` beyond that keeps more transfers in flight, which helps a distant store, but
/// more codecs at once would only hold more memory (a window and a codec state each) for no speed.
pub fn slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        tokio::sync::Semaphore::new(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
        )
    })
}
