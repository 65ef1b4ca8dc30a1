//! csm, the program around the actors: configuration, TLS, the server's
//! start and shutdown, the admin client and the client library used by the
//! simulator and the tests.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod password;
pub mod save;
pub mod serve;
pub mod sim;
pub mod tls;
pub mod trim;
