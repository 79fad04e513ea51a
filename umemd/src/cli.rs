//! `umemd`'s command line: its flags, also rendered into its man page and shell completions.

use std::path::PathBuf;

use clap::Parser;

use crate::admission;
use crate::congestion::CongestionPolicy;

/// The umem migration daemon.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Socket on which VMMs connect (ignored when systemd passes one).
    #[arg(long, default_value = "/run/umem/umemd.sock")]
    pub socket: PathBuf,
    /// Make the socket 0660 and owned by this group (name or gid) instead of 0600; the allow
    /// list still decides who is served.
    #[arg(long, value_name = "NAME|GID")]
    pub socket_group: Option<String>,
    /// Also serve clients of this uid (root and umemd's own uid always are); repeatable.
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Also serve clients whose primary group is this one (name or gid); repeatable.
    #[arg(long, value_name = "NAME|GID")]
    pub allow_gid: Vec<String>,
    /// Drop a client whose whole opening message has not arrived this long after it connected.
    #[arg(long, value_name = "MS", default_value_t = admission::DEFAULT_OPENING_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub opening_timeout_ms: u64,
    /// Most sessions at once; a client over it gets Failed.
    #[arg(long, value_name = "N", default_value_t = admission::DEFAULT_MAX_SESSIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions: u64,
    /// Most sessions at once of one client uid (VMMs that all run as root share it).
    #[arg(long, value_name = "N", default_value_t = admission::DEFAULT_MAX_SESSIONS_PER_UID as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions_per_uid: u64,
    /// The host's migration secret, in a file only its owner can read: every migration whose
    /// VMM gave no secret of its own authenticates its peers with it.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The host's TLS credentials: a directory with ca-cert.pem, server-cert.pem and
    /// server-key.pem (to receive), client-cert.pem and client-key.pem (to send). Every
    /// migration whose VMM gave no directory of its own runs its TCP connections over TLS 1.3
    /// with them, both sides presenting a certificate of the CA.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) over HTTP at this address, e.g. 127.0.0.1:9464;
    /// unauthenticated, so keep it on a trusted network. Off when not given.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// While a migration's switchover and postcopy run, ask the kernel (PM QoS,
    /// /dev/cpu_dma_latency) for idle CPUs that wake within this many microseconds, so that the
    /// threads a page request wakes start at once; 0 keeps idle CPUs polling for that time.
    /// `off` leaves the host's idle policy alone.
    #[arg(long, value_name = "US|off", default_value = "0", value_parser = parse_wake_latency)]
    pub cpu_wake_latency_us: WakeBound,
    /// The TCP congestion control of migration connections, set on each before it connects
    /// or listens: an algorithm's name, or `host` for the host's default. CUBIC does not pace;
    /// BBR, a common host default, paces each connection, which delays requested pages and
    /// costs the receiver a wake-up per paced burst. If the host refuses cubic, reno.
    #[arg(long, value_name = "NAME|host", default_value = crate::congestion::DEFAULT_ALGORITHM)]
    pub congestion_control: CongestionPolicy,
}

/// `--cpu-wake-latency-us`: a bound in microseconds, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeBound(pub Option<u32>);

fn parse_wake_latency(s: &str) -> Result<WakeBound, String> {
    match s {
        "off" => Ok(WakeBound(None)),
        us => us
            .parse()
            .map(|us| WakeBound(Some(us)))
            .map_err(|e| format!("{e}: microseconds, or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("umemd").chain(args.iter().copied()))
    }

    #[test]
    fn the_congestion_control_is_a_name_or_host_and_cubic_by_default() {
        assert_eq!(
            parse(&[]).unwrap().congestion_control,
            CongestionPolicy::Named("cubic".into())
        );
        let a = parse(&["--congestion-control", "host"]).unwrap();
        assert_eq!(a.congestion_control, CongestionPolicy::Host);
        let a = parse(&["--congestion-control", "bbr"]).unwrap();
        assert_eq!(a.congestion_control, CongestionPolicy::Named("bbr".into()));
        assert!(parse(&["--congestion-control", ""]).is_err());
    }

    #[test]
    fn the_wake_latency_bound_is_microseconds_or_off_and_zero_by_default() {
        assert_eq!(parse(&[]).unwrap().cpu_wake_latency_us, WakeBound(Some(0)));
        let a = parse(&["--cpu-wake-latency-us", "50"]).unwrap();
        assert_eq!(a.cpu_wake_latency_us, WakeBound(Some(50)));
        let a = parse(&["--cpu-wake-latency-us", "off"]).unwrap();
        assert_eq!(a.cpu_wake_latency_us, WakeBound(None));
        for bad in ["-1", "soon", ""] {
            let arg = format!("--cpu-wake-latency-us={bad}");
            let e = parse(&[&arg]).unwrap_err().to_string();
            assert!(e.contains("microseconds, or off"), "{bad:?}: {e}");
        }
    }
}
