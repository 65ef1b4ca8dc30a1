//! The disk under the store: the reserve that keeps sends off a nearly
//! full disk, and the reopen of a store that failed a write once there is
//! room again.

use crate::proto::lines::{ErrorCode, StreamError};
use crate::store::StoreError;

use super::Mailboxes;

/// A send that cannot be written for want of a working disk: the store
/// failed a write (it takes no more until it is reopened) or the disk
/// is full. Nothing is stored; the sender tries again later with the same
/// id.
pub fn cannot_write(reason: impl std::fmt::Display) -> StreamError {
    StreamError::new(
        ErrorCode::Unavailable,
        format!("the server cannot store messages now ({reason}); try again later"),
    )
}

/// Free bytes at which a store that failed for want of space is reopened,
/// when the disk reserve is off.
const REOPEN_FREE_BYTES: u64 = 16 << 20;

/// Free bytes on the store's filesystem at which a failed store is
/// reopened: the disk reserve, or [`REOPEN_FREE_BYTES`] when it is off.
pub fn room_to_reopen(disk_reserve: u64) -> u64 {
    match disk_reserve {
        0 => REOPEN_FREE_BYTES,
        reserve => reserve,
    }
}

/// True for the errors of a full disk or of a store that failed.
pub(super) fn is_disk_failure(e: &StoreError) -> bool {
    match e {
        StoreError::Failed(_) => true,
        StoreError::File(io) => matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ),
        _ => false,
    }
}

impl Mailboxes {
    /// Publishes the free space of the store's filesystem, for operators
    /// to watch between sends too.
    pub fn publish_disk_free(&self) {
        if let Some(free) = self.store.free_space() {
            metrics::gauge!(crate::metrics::DISK_FREE_BYTES).set(free as f64);
        }
    }

    /// The reason the store failed a write, once its filesystem has room
    /// for it to be reopened ([`room_to_reopen`]). `None` while the store
    /// works, or while the disk is still full.
    pub fn due_for_reopen(&self) -> Option<String> {
        let reason = self.store.failed()?;
        let wanted = room_to_reopen(self.settings.disk_reserve);
        match self.store.free_space() {
            Some(free) if free < wanted => None,
            _ => Some(reason),
        }
    }

    /// Refuses a send of `size` bytes that would eat into the disk reserve.
    /// The store fails for good on a write error (sled 0.34.7 needs a
    /// reopen), so the refusal must come before the write: this keeps the
    /// server receiving and removing on a full disk, and sending again as
    /// soon as space returns.
    pub(super) fn check_disk_space(&mut self, size: u64) -> Result<(), StreamError> {
        let reserve = self.settings.disk_reserve;
        let Some(free) = self.store.free_space().filter(|_| reserve > 0) else {
            return Ok(());
        };
        metrics::gauge!(crate::metrics::DISK_FREE_BYTES).set(free as f64);
        if room_for(free, reserve, size) {
            if std::mem::take(&mut self.disk_low) {
                log::warn!("disk space back ({free} bytes free): accepting sends again");
            }
            return Ok(());
        }
        if !std::mem::replace(&mut self.disk_low, true) {
            log::error!(
                "disk space low: {free} bytes free, {reserve} kept in reserve; \
                 refusing sends until space returns"
            );
        }
        Err(low_on_disk(free, reserve))
    }
}

/// Whether `size` bytes of data, its header and the store's own
/// bookkeeping fit in `free` bytes without eating into `reserve`.
pub(super) fn room_for(free: u64, reserve: u64, size: u64) -> bool {
    free >= reserve.saturating_add(size.saturating_add(64 * 1024))
}

/// The refusal of a send that would eat into the disk reserve.
pub(super) fn low_on_disk(free: u64, reserve: u64) -> StreamError {
    metrics::counter!(crate::metrics::SENDS_REFUSED_DISK_LOW).increment(1);
    StreamError::new(
        ErrorCode::Unavailable,
        format!(
            "the server is low on disk space ({free} bytes free, {reserve} kept in reserve); \
             try again later"
        ),
    )
}
