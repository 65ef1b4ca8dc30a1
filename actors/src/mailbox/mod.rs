//! The durable mailboxes of the embedded store. [`MailboxActor`]
//! (`actor.rs`) is the only part that speaks actor messages; under it,
//! plain data and functions: the index over the store (`index.rs`), the
//! disk reserve and the reopen after a failed write (`disk.rs`), the
//! pruning of retained ids (`pruning.rs`), the admin's view (`view.rs`),
//! the one encoding of `MessageAvailable` (`notice.rs`, shared with the
//! PostgreSQL backend), and the large data that couriers write before the
//! actor records it (`staging.rs`).

mod actor;
mod disk;
mod index;
mod notice;
mod pruning;
mod staging;
mod view;

pub use actor::MailboxActor;
pub use disk::{cannot_write, room_to_reopen};
pub use index::digest;
pub(crate) use index::no_such_message;
pub use index::{internal, Entry, MailboxSettings, Mailboxes, NewMessage, Stored, Uncommitted};
pub use notice::{notice_frame, queue_notices, write_notice};
pub use pruning::{IdPruning, PRUNE_CHUNK};
pub use staging::Stager;
pub use view::{MailboxItem, MailboxStats};
