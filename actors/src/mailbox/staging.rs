//! Large message data written to the disk by the connection that read it,
//! before the mailbox actor records it. The actor writes the record of
//! every send; were it to write and sync a multi-megabyte file too, every
//! other send, receive and removal would wait for that disk write. The
//! courier stages the data on the blocking pool instead, and the actor
//! only records it (see `store/spool.rs` for the order of durability).

use std::sync::Arc;

use crate::store::{NewData, Store};

use super::disk::room_for;

/// Stages message data into the embedded store's spool; see the module
/// doc. Call it where blocking is allowed.
pub struct Stager {
    store: Arc<dyn Store>,
    /// Bytes of disk kept free (`limits.disk_reserve_bytes`).
    disk_reserve: u64,
}

impl Stager {
    pub fn new(store: Arc<dyn Store>, disk_reserve: u64) -> Stager {
        Stager {
            store,
            disk_reserve,
        }
    }

    /// The data as the mailbox should get it: written into the spool when
    /// it is large enough to be kept there and the disk takes it, in
    /// memory otherwise. Data that is not staged is written by the mailbox
    /// as before, after the checks that come first (quota, id, then disk
    /// reserve), so staging changes no answer.
    pub fn stage(&self, data: Vec<u8>) -> NewData {
        if data.len() < crate::store::SPOOL_FROM_BYTES {
            return NewData::Bytes(data);
        }
        if self.disk_reserve > 0 {
            let free = self.store.free_space();
            if free.is_some_and(|free| !room_for(free, self.disk_reserve, data.len() as u64)) {
                return NewData::Bytes(data);
            }
        }
        match self.store.stage(&data) {
            Ok(Some(staged)) => NewData::Staged(staged),
            Ok(None) => NewData::Bytes(data),
            Err(e) => {
                log::debug!(
                    "staging {} bytes failed ({e}): the mailbox writes them",
                    data.len()
                );
                NewData::Bytes(data)
            }
        }
    }
}
