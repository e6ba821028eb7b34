//! Handing memory back to the operating system once sessions leave it.
//!
//! glibc's allocator keeps the pages of freed blocks for reuse, so a server whose sessions
//! have ended and left memory still shows the peak in its resident size. After sessions leave
//! memory, [`Trimmer`] asks the allocator to return what it holds free (`malloc_trim`), at most
//! once per period, off the async threads. On other platforms it does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Remembers that something was released and trims, at most once per period, after it.
#[derive(Debug, Clone, Default)]
pub struct Trimmer {
    released: Arc<AtomicBool>,
}

impl Trimmer {
    /// Something large was freed (a session left memory): trim at the next period.
    pub fn released(&self) {
        self.released.store(true, Ordering::Relaxed);
    }

    /// Trims every `period` after something was released, until the token is cancelled.
    pub fn spawn(&self, period: Duration, stop: tokio_util::sync::CancellationToken) {
        let released = Arc::clone(&self.released);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if released.swap(false, Ordering::Relaxed) {
                    // Walking the heap takes a few milliseconds: not on an async worker.
                    let _ = tokio::task::spawn_blocking(trim).await;
                }
            }
        });
    }
}

/// Returns the allocator's free pages to the operating system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
