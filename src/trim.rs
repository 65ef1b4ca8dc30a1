//! Gives memory that a burst used back to the system. When thousands of
//! sessions sign on at once, each holds its sign-on list and the presence
//! of the others until its peer has read them; once they are written the
//! memory is free, but glibc's allocator keeps the pages of its arenas for
//! reuse, so an idle server would stay at the size of its busiest moment.
//! A thread of its own asks the allocator to return free pages every few
//! seconds, so that an idle server holds what its sessions use.

use std::time::Duration;

/// How often free pages are returned. A trim walks the allocator's free
/// lists under its locks (milliseconds after a burst of hundreds of MiB,
/// microseconds when there is nothing to give back).
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Starts the trimming thread, once per process (with glibc; other
/// allocators return memory by themselves or not at all).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn start() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("csm-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                trim();
            });
        if let Err(e) = spawned {
            log::warn!("memory freed after bursts will not be returned: {e}");
        }
    });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn start() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    let started = std::time::Instant::now();
    // SAFETY: malloc_trim only walks and releases glibc's own free lists.
    let released = unsafe { libc::malloc_trim(0) };
    if released != 0 {
        log::debug!(
            "returned free memory to the system in {:?}",
            started.elapsed()
        );
    }
}
