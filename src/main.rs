//! The `csm` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use csm::cli::{Cli, Command, ServeArgs};
use csm::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A client's or an admin's standard error is its user's terminal: only
    // warnings there (an admin run without a server opens the store with
    // the server's own actors, which log their start at info).
    let default_level = match cli.command {
        Command::Client(_) | Command::Admin(_) => "warn",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
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
        Command::Client(args) => csm::client::cmd::run(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), args.overrides())?;
    let system = actix::System::new();
    system.block_on(async move {
        // Handlers first: a signal that arrives as soon as the server says
        // it is ready must already mean a graceful shutdown.
        let shutdown = shutdown_signal()?;
        let (session, message) = csm::serve::bind(&config).await?;
        csm::serve::run(config, session, message, |_| {}, shutdown).await
    })
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on
/// either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => log::info!("SIGINT received"),
            _ = terminate.recv() => log::info!("SIGTERM received"),
        }
    })
}
