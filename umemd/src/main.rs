//! `umemd` command line: the flags are in `umemd::cli`.

use std::time::Duration;

use clap::Parser;
use log::info;
use proto::peercred::{self, AllowList};
use umemd::admission::Limits;
use umemd::cli::Args;

fn fail(what: &str) -> ! {
    // Once, whatever RUST_LOG says: the reason umemd stops.
    eprintln!("umemd: {what}");
    std::process::exit(1);
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let group = args.socket_group.as_deref().map(|g| {
        peercred::resolve_group(g).unwrap_or_else(|e| fail(&format!("--socket-group: {e}")))
    });
    let gids = args
        .allow_gid
        .iter()
        .map(|g| peercred::resolve_group(g).unwrap_or_else(|e| fail(&format!("--allow-gid: {e}"))))
        .collect();
    if let Some(f) = &args.secret_file {
        let secret = proto::auth::Secret::from_file(f)
            .unwrap_or_else(|e| fail(&format!("--secret-file: {e}")));
        umemd::auth::set_host_secret(secret);
        info!("peers authenticate with the secret in {}", f.display());
    }
    if let Some(dir) = &args.tls_creds {
        umemd::tls::check_host_creds(dir).unwrap_or_else(|e| fail(&format!("--tls-creds: {e}")));
        umemd::tls::set_host_creds(dir.clone());
        info!(
            "peer connections run TLS with the credentials in {}",
            dir.display()
        );
    }
    umemd::wake::set_policy(args.cpu_wake_latency_us.0);
    umemd::congestion::set_policy(args.congestion_control.clone());
    let limits = Limits {
        allow: AllowList::for_this_process(args.allow_uid.clone(), gids),
        opening_timeout: Duration::from_millis(args.opening_timeout_ms),
        max_sessions: usize::try_from(args.max_sessions).unwrap_or(usize::MAX),
        max_sessions_per_uid: usize::try_from(args.max_sessions_per_uid).unwrap_or(usize::MAX),
    };
    if let Some(addr) = args.metrics {
        match umemd::metrics::http::start(addr) {
            Ok(bound) => info!("serving metrics on http://{bound}/metrics"),
            Err(e) => fail(&format!("--metrics {addr}: {e}")),
        }
    }
    let listener = match umemd::daemon::bind_for_group(&args.socket, group) {
        Ok(l) => l,
        Err(e) => fail(&format!("control socket {}: {e}", args.socket.display())),
    };
    match listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
    {
        Some(p) => info!("umemd listening on {}", p.display()),
        None => info!("umemd listening on the socket it was given"),
    }
    if let Err(e) = umemd::daemon::serve_with(listener, limits) {
        fail(&format!("event loop: {e}"));
    }
}
