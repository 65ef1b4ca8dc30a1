//! `csm client chat`: the interactive terminal view.

use std::path::PathBuf;
use std::time::Duration;

use super::{Account, Server};

pub async fn run(
    _server: Server,
    _account: Account,
    _idle_after: Duration,
    _save: Option<PathBuf>,
) -> Result<(), String> {
    Err("not built yet".into())
}
