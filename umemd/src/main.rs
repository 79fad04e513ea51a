//! `umemd` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use log::info;
use proto::peercred::{self, AllowList};
use umemd::admission::{self, Limits};

/// The umem migration daemon.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Socket on which VMMs connect (ignored when systemd passes one).
    #[arg(long, default_value = "/run/umem/umemd.sock")]
    socket: PathBuf,
    /// Make the socket 0660 and owned by this group (name or gid) instead of 0600; the allow
    /// list still decides who is served.
    #[arg(long, value_name = "NAME|GID")]
    socket_group: Option<String>,
    /// Also serve clients of this uid (root and umemd's own uid always are); repeatable.
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Also serve clients whose primary group is this one (name or gid); repeatable.
    #[arg(long, value_name = "NAME|GID")]
    allow_gid: Vec<String>,
    /// Drop a client whose whole opening message has not arrived this long after it connected.
    #[arg(long, value_name = "MS", default_value_t = admission::DEFAULT_OPENING_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    opening_timeout_ms: u64,
    /// Most sessions at once; a client over it gets Failed.
    #[arg(long, value_name = "N", default_value_t = admission::DEFAULT_MAX_SESSIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: u64,
    /// Most sessions at once of one client uid (VMMs that all run as root share it).
    #[arg(long, value_name = "N", default_value_t = admission::DEFAULT_MAX_SESSIONS_PER_UID as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions_per_uid: u64,
    /// The host's migration secret, in a file only its owner can read: every migration whose
    /// VMM gave no secret of its own authenticates its peers with it.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// The host's TLS credentials: a directory with ca-cert.pem, server-cert.pem and
    /// server-key.pem (to receive), client-cert.pem and client-key.pem (to send). Every
    /// migration whose VMM gave no directory of its own runs its TCP connections over TLS 1.3
    /// with them, both sides presenting a certificate of the CA.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) over HTTP at this address, e.g. 127.0.0.1:9464;
    /// unauthenticated, so keep it on a trusted network. Off when not given.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

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
