//! The address of whichever actor owns the mailboxes: the embedded
//! [`crate::mailbox::MailboxActor`] on sled, or the
//! [`crate::shared_mailbox::SharedMailboxActor`] on PostgreSQL. Both take
//! the same typed messages, so sessions, couriers and the admin socket do
//! not know which one they talk to.

use actix::dev::{RecipientRequest, ToEnvelope};
use actix::{Actor, Addr, Handler, Message, Recipient};

use crate::messages::{
    Backup, Deliver, DropMailbox, Fetch, ListMailbox, MailboxStatsRequest, Purge, Remove,
    Subscribe, Unsubscribe,
};

/// One recipient per mailbox message; cheap to clone.
#[derive(Clone)]
pub struct MailboxHandle {
    deliver: Recipient<Deliver>,
    fetch: Recipient<Fetch>,
    remove: Recipient<Remove>,
    purge: Recipient<Purge>,
    drop_mailbox: Recipient<DropMailbox>,
    backup: Recipient<Backup>,
    list: Recipient<ListMailbox>,
    stats: Recipient<MailboxStatsRequest>,
    subscribe: Recipient<Subscribe>,
    unsubscribe: Recipient<Unsubscribe>,
}

/// A message the mailbox owner takes, and where the handle keeps its
/// recipient.
pub trait MailboxRequest: Message + Send + Sized + 'static
where
    Self::Result: Send,
{
    fn recipient(handle: &MailboxHandle) -> &Recipient<Self>;
}

macro_rules! routed {
    ($($message:ty => $field:ident),* $(,)?) => {
        $(impl MailboxRequest for $message {
            fn recipient(handle: &MailboxHandle) -> &Recipient<Self> {
                &handle.$field
            }
        })*

        impl MailboxHandle {
            /// The handle of an actor that takes every mailbox message.
            pub fn of<A>(addr: &Addr<A>) -> MailboxHandle
            where
                A: Actor $(+ Handler<$message>)*,
                $(A::Context: ToEnvelope<A, $message>,)*
            {
                MailboxHandle {
                    $($field: addr.clone().recipient(),)*
                }
            }
        }
    };
}

routed! {
    Deliver => deliver,
    Fetch => fetch,
    Remove => remove,
    Purge => purge,
    DropMailbox => drop_mailbox,
    Backup => backup,
    ListMailbox => list,
    MailboxStatsRequest => stats,
    Subscribe => subscribe,
    Unsubscribe => unsubscribe,
}

impl MailboxHandle {
    /// Sends `msg` and resolves with the answer (an error if the actor is
    /// gone or its queue is full).
    pub fn send<M: MailboxRequest>(&self, msg: M) -> RecipientRequest<M>
    where
        M::Result: Send,
    {
        M::recipient(self).send(msg)
    }

    /// Sends `msg` without waiting for the answer.
    pub fn do_send<M: MailboxRequest>(&self, msg: M)
    where
        M::Result: Send,
    {
        M::recipient(self).do_send(msg)
    }
}
