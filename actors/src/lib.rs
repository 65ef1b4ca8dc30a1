//! The core of csm: wire formats, the store, authentication and the actors
//! (sessions, presence, mailboxes, message-stream couriers).

pub mod auth;
pub mod courier;
pub mod mailbox;
pub mod mailboxes;
pub mod messages;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod proto;
pub mod services;
pub mod session;
pub mod settings;
pub mod store;
pub mod throttle;
