//! The metrics endpoint: `GET /metrics` over HTTP/1.x, one request per connection.
//!
//! A few lines of our own rather than an HTTP server crate: what is wanted here is mostly what
//! such crates leave out (a cap on connections, a deadline for the whole request, a cap on its
//! size). Nothing here can reach a migration: the endpoint runs on threads of its own, and a
//! scrape only copies the figures sessions published.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::encode::{Encoder, Kind, Value, CONTENT_TYPE};
use super::Registry;

/// Most connections served at once; one more gets `503` and is closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The whole request must arrive within this, and the reply leave within as long again.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes of a request (its line and headers); a longer one gets `431`.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// After a reply, what the client still sends is read and dropped, up to this much and for at
/// most [`LINGER`], so that it sees the reply rather than a reset.
const MAX_LINGER_BYTES: usize = 64 * 1024;
const LINGER: Duration = Duration::from_millis(250);
/// After a failed `accept` (descriptors exhausted, say): a pause instead of a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The replies the endpoint gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeaderTooLarge,
    Unavailable,
}

impl Status {
    const ALL: [Status; 7] = [
        Status::Ok,
        Status::BadRequest,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::RequestTimeout,
        Status::HeaderTooLarge,
        Status::Unavailable,
    ];

    fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::HeaderTooLarge => 431,
            Status::Unavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::HeaderTooLarge => "Request Header Fields Too Large",
            Status::Unavailable => "Service Unavailable",
        }
    }

    /// The body of an error reply.
    fn explanation(self) -> &'static str {
        match self {
            Status::Ok => "",
            Status::BadRequest => "not an HTTP/1.x request line\n",
            Status::NotFound => "only /metrics is served here\n",
            Status::MethodNotAllowed => "only GET is served here\n",
            Status::RequestTimeout => "the request did not arrive in time\n",
            Status::HeaderTooLarge => "the request is too large\n",
            Status::Unavailable => "too many connections; try again\n",
        }
    }
}

/// The endpoint's state: what it serves and its own counters.
struct Endpoint {
    registry: &'static Registry,
    connections: AtomicUsize,
    replies: [AtomicU64; Status::ALL.len()],
}

/// A connection's place among [`MAX_CONNECTIONS`], given back when it is dropped.
struct Slot(Arc<Endpoint>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds `addr` and serves the daemon's metrics there from now on; returns the address bound
/// (its port, when `addr` asked for any).
pub fn start(addr: SocketAddr) -> io::Result<SocketAddr> {
    start_with(addr, super::registry())
}

/// As [`start`], serving `registry`.
pub fn start_with(addr: SocketAddr, registry: &'static Registry) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let endpoint = Arc::new(Endpoint {
        registry,
        connections: AtomicUsize::new(0),
        replies: Default::default(),
    });
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, endpoint))?;
    Ok(bound)
}

fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>) {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                warn!("metrics endpoint: accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if endpoint.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            endpoint.connections.fetch_sub(1, Ordering::Relaxed);
            endpoint.count(Status::Unavailable);
            // Never waits: the reply fits the new socket's buffer, or is lost.
            if conn.set_nonblocking(true).is_ok() {
                let _ = (&conn).write_all(&reply_head(Status::Unavailable, 0, ""));
            }
            continue;
        }
        let slot = Slot(endpoint.clone());
        let r = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let slot = slot;
                serve(&slot.0, conn);
            });
        if let Err(e) = r {
            warn!("metrics endpoint: starting a connection thread: {e}");
        }
    }
}

impl Endpoint {
    fn count(&self, s: Status) {
        if let Some(i) = Status::ALL.iter().position(|x| *x == s) {
            self.replies[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The whole exposition: the registry's families, then the endpoint's own.
    fn exposition(&self) -> String {
        let mut e = Encoder::new();
        self.registry.render(&mut e);
        let name = "umemd_metrics_requests_total";
        e.family(
            name,
            "Requests to this endpoint by the status of the reply (503: over the connection cap).",
            Kind::Counter,
        );
        for (i, s) in Status::ALL.iter().enumerate() {
            let code = s.code().to_string();
            let n = self.replies[i].load(Ordering::Relaxed);
            e.sample(name, &[("code", &code)], Value::Int(n));
        }
        e.finish()
    }
}

/// Serves one connection: one request, one reply, then the connection closes.
fn serve(endpoint: &Endpoint, mut conn: TcpStream) {
    let status = match read_request(&conn, REQUEST_TIMEOUT) {
        Ok(head) => route(&head),
        Err(s) => s,
    };
    endpoint.count(status);
    if status != Status::Ok {
        debug!("metrics endpoint: {} reply", status.code());
    }
    let body = match status {
        Status::Ok => endpoint.exposition(),
        other => other.explanation().to_string(),
    };
    let content_type = if status == Status::Ok {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut reply = reply_head(status, body.len(), content_type);
    reply.extend_from_slice(body.as_bytes());
    if conn.set_write_timeout(Some(REQUEST_TIMEOUT)).is_err() || conn.write_all(&reply).is_err() {
        return;
    }
    let _ = conn.shutdown(Shutdown::Write);
    linger(&mut conn);
}

fn reply_head(status: Status, len: usize, content_type: &str) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", status.code(), status.reason());
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if status == Status::MethodNotAllowed {
        head.push_str("Allow: GET\r\n");
    }
    head.push_str(&format!(
        "Content-Length: {len}\r\nConnection: close\r\n\r\n"
    ));
    head.into_bytes()
}

/// Reads and drops what the client still sends, within bounds, before the socket closes.
fn linger(conn: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut left = MAX_LINGER_BYTES;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || conn.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Reads a request's line and headers (up to the blank line), all of it within `timeout` and
/// [`MAX_REQUEST_BYTES`].
fn read_request(conn: &TcpStream, timeout: Duration) -> Result<Vec<u8>, Status> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(Status::HeaderTooLarge);
        }
        // Each read waits only for what is left of the whole deadline: a client sending a
        // byte now and then gains nothing.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Status::RequestTimeout);
        }
        conn.set_read_timeout(Some(left))
            .map_err(|_| Status::BadRequest)?;
        let want = chunk.len().min(MAX_REQUEST_BYTES - buf.len());
        match (&*conn).read(&mut chunk[..want]) {
            Ok(0) => return Err(Status::BadRequest),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Status::RequestTimeout)
            }
            Err(_) => return Err(Status::BadRequest),
        }
    }
}

/// Where the request's head ends: at its blank line (`\r\n\r\n`, or `\n\n` from a lenient
/// client).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the request asks for: only `GET /metrics` (with any query) is served.
fn route(head: &[u8]) -> Status {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Status::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Status::BadRequest;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Status::BadRequest;
    }
    if method != "GET" {
        return Status::MethodNotAllowed;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Status::Ok
    } else {
        Status::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1"), Status::Ok);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\nHost: a"), Status::Ok);
        assert_eq!(route(b"GET / HTTP/1.1"), Status::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1"), Status::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Status::MethodNotAllowed);
        assert_eq!(route(b"HEAD /metrics HTTP/1.1"), Status::MethodNotAllowed);
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET /metrics HTTP/2",
            b"GET  /metrics HTTP/1.1",
            b"GET metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 extra",
            b"\xff\xfe /metrics HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert_eq!(route(bad), Status::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn a_scrape_gets_the_exposition_and_errors_get_their_status() {
        let registry: &'static Registry = Box::leak(Box::new(Registry::new()));
        let _s = registry.open("vm", super::super::Role::Source);
        let addr = start_with("127.0.0.1:0".parse().unwrap(), registry).unwrap();
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.contains("umemd_sessions_open{role=\"source\"} 1"),
            "{body}"
        );
        let not_found = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(not_found.starts_with("HTTP/1.1 404 "), "{not_found}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET\r\n"), "{post}");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let big = exchange(addr, huge.as_bytes());
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        let again = exchange(addr, b"GET /metrics HTTP/1.0\n\n");
        assert!(
            again.contains("umemd_metrics_requests_total{code=\"404\"} 1"),
            "{again}"
        );
        assert!(
            again.contains("umemd_metrics_requests_total{code=\"431\"} 1"),
            "{again}"
        );
    }

    #[test]
    fn a_bind_failure_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = start(taken.local_addr().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
