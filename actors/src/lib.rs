//! The core of csm: wire formats, the store, authentication and the actors
//! (sessions, presence, mailboxes, message-stream couriers).

pub mod proto;
