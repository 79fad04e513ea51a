//! `umemd` command line.

use std::path::PathBuf;

use clap::Parser;
use log::{error, info};

/// The umem migration daemon.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Socket on which VMMs connect (ignored when systemd passes one).
    #[arg(long, default_value = "/run/umem/umemd.sock")]
    socket: PathBuf,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let listener = match umemd::daemon::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            error!("control socket {}: {e}", args.socket.display());
            eprintln!("umemd: control socket {}: {e}", args.socket.display());
            std::process::exit(1);
        }
    };
    match listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
    {
        Some(p) => info!("umemd listening on {}", p.display()),
        None => info!("umemd listening on the socket it was given"),
    }
    if let Err(e) = umemd::daemon::serve(listener) {
        error!("event loop: {e}");
        std::process::exit(1);
    }
}
