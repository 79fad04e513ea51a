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
    info!("umemd listening on {}", args.socket.display());
    if let Err(e) = umemd::daemon::serve(listener) {
        error!("event loop: {e}");
        std::process::exit(1);
    }
}
