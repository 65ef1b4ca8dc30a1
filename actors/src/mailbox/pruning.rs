//! Forgetting retained message ids once their retention is over, in
//! bounded chunks in acceptance order, so memory and the time between two
//! sends stay bounded however many ids a day brings.

use crate::store::{unix_now, DatedId};

use super::Mailboxes;

/// Ids read and pruned per step of a pruning pass.
pub const PRUNE_CHUNK: usize = 1_000;

/// Where a pruning pass over the retained ids stands.
#[derive(Debug)]
pub struct IdPruning {
    cutoff: u64,
    after: Option<DatedId>,
    pruned: usize,
}

impl Mailboxes {
    /// Forgets every retained id older than the retention whose message
    /// no mailbox holds, in one go (the offline admin and tests; the actor
    /// prunes chunk by chunk between its other work).
    pub fn prune_ids(&mut self) {
        let mut pass = self.start_id_pruning();
        while self.prune_id_chunk(&mut pass) {}
    }

    /// A pruning pass over the ids accepted before the retention began.
    pub fn start_id_pruning(&self) -> IdPruning {
        IdPruning {
            cutoff: unix_now().saturating_sub(self.settings.id_retention.as_secs()),
            after: None,
            pruned: 0,
        }
    }

    /// Prunes the next chunk of at most [`PRUNE_CHUNK`] ids; false once
    /// the pass is over. Ids are kept in acceptance order, so a chunk
    /// reads only ids that are due, never the whole set.
    pub fn prune_id_chunk(&mut self, pass: &mut IdPruning) -> bool {
        let chunk =
            match self
                .store
                .ids_accepted_before(pass.cutoff, pass.after.as_ref(), PRUNE_CHUNK)
            {
                Ok(chunk) => chunk,
                Err(e) => {
                    log::warn!("could not read message ids for pruning: {e}");
                    return false;
                }
            };
        for dated in &chunk {
            let waiting = dated.seq.is_some_and(|seq| self.holders.contains_key(&seq));
            if waiting {
                continue;
            }
            if let Err(e) = self.store.remove_id(dated) {
                log::warn!("could not prune message id: {e}");
                return false;
            }
            pass.pruned += 1;
        }
        let more = chunk.len() == PRUNE_CHUNK;
        pass.after = chunk.into_iter().last();
        if !more && pass.pruned > 0 {
            log::info!(
                "pruned {} message ids older than {:?}",
                pass.pruned,
                self.settings.id_retention
            );
        }
        more
    }
}
