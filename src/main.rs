//! The `csm` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use csm::cli::{Cli, Command, ServeArgs};
use csm::config::Config;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Admin(args) => csm::admin::run(args),
        Command::Sim(args) => csm::sim::run(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), args.overrides())?;
    let system = actix::System::new();
    system.block_on(async move {
        let (session, message) = csm::serve::bind(&config).await?;
        csm::serve::run(config, session, message, |_| {}, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            log::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received"),
        _ = term.recv() => log::info!("SIGTERM received"),
    }
}
