//! The congestion control of umemd's TCP connections.
//!
//! BBR, the host default on many clouds, paces every connection: the kernel holds each burst
//! until a timer at the rate BBR measured. A migration's main stream is one bulk flow whose
//! receiver is busy placing pages; paced, its data comes in small pieces, each a wake-up and a
//! pass through the receive path, and the timers and the transmits they start run in softirq
//! on whichever core they land, in front of a fault's threads. The urgent channel carries a
//! page now and then, so the rate BBR measures on it is low and a requested page waits for the
//! timer. umemd therefore runs CUBIC, which sends as the window allows, unless the operator
//! names another algorithm (`--congestion-control`).

use std::sync::{Once, OnceLock};

use log::warn;
use socket2::SockRef;

/// What umemd's TCP connections run unless told otherwise.
pub const DEFAULT_ALGORITHM: &str = "cubic";
/// What they run when the host refuses [`DEFAULT_ALGORITHM`] (not loaded, or not in
/// `net.ipv4.tcp_allowed_congestion_control` for a user without `CAP_NET_ADMIN`): every kernel
/// has Reno and lets any user pick it, and it does not pace either.
pub const FALLBACK_ALGORITHM: &str = "reno";
/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX`, with its terminating zero).
const NAME_MAX: usize = 15;

/// The congestion control umemd sets on its TCP connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CongestionPolicy {
    /// The host's default (`net.ipv4.tcp_congestion_control`), left alone.
    Host,
    /// This algorithm; a host that refuses it keeps its default.
    Named(String),
}

impl Default for CongestionPolicy {
    fn default() -> Self {
        CongestionPolicy::Named(DEFAULT_ALGORITHM.into())
    }
}

impl std::str::FromStr for CongestionPolicy {
    type Err = String;

    /// `host`, or an algorithm's name as the kernel knows it (`cubic`, `bbr`, `reno`...).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CongestionPolicy::Host),
            "" => Err("an algorithm's name, or host".into()),
            s if s.len() > NAME_MAX => Err(format!(
                "\"{s}\" is longer than an algorithm's name can be ({NAME_MAX} bytes)"
            )),
            s if !s.bytes().all(|b| b.is_ascii_graphic()) => {
                Err(format!("\"{s}\" is not an algorithm's name"))
            }
            s => Ok(CongestionPolicy::Named(s.into())),
        }
    }
}

static POLICY: OnceLock<CongestionPolicy> = OnceLock::new();
static REFUSAL_LOGGED: Once = Once::new();

/// Sets, once at start, what umemd's TCP connections run.
pub fn set_policy(policy: CongestionPolicy) {
    let _ = POLICY.set(policy);
}

/// Sets this umemd's policy on `sock`: before it connects, or on a listener before it accepts
/// (accepted connections take the listener's algorithm). Set later, BBR would already have
/// started and left the connection paced.
pub fn apply(sock: SockRef<'_>) {
    apply_policy(sock, POLICY.get_or_init(CongestionPolicy::default));
}

/// [`apply`] with `policy`. Returns the algorithm set, if any. A refusal is logged once and
/// the host's default stays: it costs latency, never the migration.
pub fn apply_policy<'a>(sock: SockRef<'_>, policy: &'a CongestionPolicy) -> Option<&'a str> {
    let CongestionPolicy::Named(name) = policy else {
        return None;
    };
    let refused = match sock.set_tcp_congestion(name.as_bytes()) {
        Ok(()) => return Some(name),
        Err(e) => e,
    };
    if name == DEFAULT_ALGORITHM
        && sock
            .set_tcp_congestion(FALLBACK_ALGORITHM.as_bytes())
            .is_ok()
    {
        return Some(FALLBACK_ALGORITHM);
    }
    REFUSAL_LOGGED.call_once(|| {
        warn!("congestion control {name} refused ({refused}): TCP connections keep the host's default");
    });
    None
}

/// The algorithm `sock` runs, as the kernel names it.
pub fn algorithm_of(sock: SockRef<'_>) -> std::io::Result<String> {
    let name = sock.tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn host_default() -> String {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .unwrap()
            .trim()
            .to_string()
    }

    fn socket() -> socket2::Socket {
        use socket2::{Domain, Protocol, Socket, Type};
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap()
    }

    #[test]
    fn the_policy_is_host_or_a_name_and_cubic_by_default() {
        assert_eq!(CongestionPolicy::default(), "cubic".parse().unwrap());
        assert_eq!("host".parse(), Ok(CongestionPolicy::Host));
        assert_eq!("bbr".parse(), Ok(CongestionPolicy::Named("bbr".into())));
        for bad in ["", "a-name-longer-than-15", "two words", "tab\t"] {
            let e = bad.parse::<CongestionPolicy>().unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_runs_cubic_or_reno_and_host_leaves_the_hosts_choice() {
        let s = socket();
        let policy = CongestionPolicy::default();
        let set = apply_policy(SockRef::from(&s), &policy);
        let now = algorithm_of(SockRef::from(&s)).unwrap();
        assert!(now == "cubic" || now == "reno", "{now}");
        assert_eq!(set, Some(now.as_str()));

        let s = socket();
        assert_eq!(
            apply_policy(SockRef::from(&s), &CongestionPolicy::Host),
            None
        );
        assert_eq!(algorithm_of(SockRef::from(&s)).unwrap(), host_default());
    }

    #[test]
    fn an_algorithm_the_host_lacks_leaves_its_default() {
        let s = socket();
        let lacking = CongestionPolicy::Named("no-such-cc".into());
        assert_eq!(apply_policy(SockRef::from(&s), &lacking), None);
        assert_eq!(algorithm_of(SockRef::from(&s)).unwrap(), host_default());
    }

    #[test]
    fn accepted_connections_take_the_listeners_algorithm() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        apply_policy(
            SockRef::from(&l),
            &CongestionPolicy::Named(FALLBACK_ALGORITHM.into()),
        )
        .unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(algorithm_of(SockRef::from(&a)).unwrap(), "reno");
        assert_eq!(algorithm_of(SockRef::from(&c)).unwrap(), host_default());
    }
}
