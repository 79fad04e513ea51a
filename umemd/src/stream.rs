//! The migration stream's transport: TCP between hosts (`tcp:HOST:PORT`), TLS over it when the
//! migration has TLS credentials (see [`crate::tls`]), or a Unix socket for a migration within
//! one host (`unix:PATH`). Everything above it reads and writes bytes.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::mapping::GuestMapping;
use crate::tls::{Plain, TlsError, TlsStream};
use vm_memory::VolatileSlice;

/// Send (source) and receive (destination) buffer of the main stream once postcopy runs. A
/// requested page that the background had already claimed waits behind what is queued there,
/// so the queue is kept short; loopback still streams at full speed with it.
pub const POSTCOPY_SOCKET_BUFFER: usize = 256 << 10;

/// A TCP connection to `addr` within `timeout`, running umemd's congestion control from its
/// first segment (see [`crate::congestion`]).
fn tcp_connect(addr: &std::net::SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockRef, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    crate::congestion::apply(SockRef::from(&sock));
    sock.connect_timeout(&(*addr).into(), timeout)?;
    Ok(sock.into())
}

/// Errors of opening a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The URI is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("{kind} uri \"{uri}\" (expected {expected})")]
    BadUri {
        /// "malformed" or "unsupported".
        kind: &'static str,
        /// The URI given.
        uri: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The host name does not resolve.
    #[error("resolving {addr}: {err}")]
    Resolve {
        /// `HOST:PORT`.
        addr: String,
        /// Why.
        err: io::Error,
    },
    /// The host name resolves to nothing.
    #[error("no address for {0}")]
    NoAddress(String),
    /// Connecting failed.
    #[error("connecting to destination {to}: {err}")]
    Connect {
        /// Address or path.
        to: String,
        /// Why.
        err: io::Error,
    },
    /// Listening failed.
    #[error("listening on {on}: {err}")]
    Listen {
        /// Address or path.
        on: String,
        /// Why.
        err: io::Error,
    },
    /// Another socket operation failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Where a migration stream goes, parsed from a URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT`: the `HOST:PORT` part.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `tcp:HOST:PORT` or `unix:PATH`.
    pub fn parse(uri: &str) -> Result<Self, StreamError> {
        let bad = |kind, expected| StreamError::BadUri {
            kind,
            uri: uri.to_string(),
            expected,
        };
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("malformed", "unix:PATH"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let rest = uri
            .strip_prefix("tcp:")
            .ok_or_else(|| bad("unsupported", "tcp:HOST:PORT or unix:PATH"))?;
        if rest
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(bad("malformed", "tcp:HOST:PORT"));
        }
        Ok(Endpoint::Tcp(rest.to_string()))
    }
}

/// One connection of a migration stream.
#[derive(Debug)]
pub enum PeerStream {
    /// Between hosts.
    Tcp(TcpStream),
    /// Within a host.
    Unix(UnixStream),
    /// Between hosts, encrypted: records sealed and opened by the threads that use it.
    Tls(TlsStream),
}

/// Keepalive and `TCP_USER_TIMEOUT` for [`PeerStream::set_link_timeout`].
fn tcp_link_timeout(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    // Keepalive in whole seconds: first probe after a third of the timeout.
    let idle = (timeout.as_secs() / 3).max(1) as u32;
    setsockopt(s, sockopt::KeepAlive, &true)
        .and_then(|_| setsockopt(s, sockopt::TcpKeepIdle, &idle))
        .and_then(|_| setsockopt(s, sockopt::TcpKeepInterval, &1))
        .and_then(|_| setsockopt(s, sockopt::TcpKeepCount, &3))
        .and_then(|_| setsockopt(s, sockopt::TcpUserTimeout, &ms))
        .map_err(io::Error::from)
}

impl PeerStream {
    /// Connects to `uri`, trying each address a host name resolves to.
    pub fn connect(uri: &str, timeout: Duration) -> Result<Self, StreamError> {
        let stream = match Endpoint::parse(uri)? {
            Endpoint::Unix(path) => {
                UnixStream::connect(&path)
                    .map(PeerStream::Unix)
                    .map_err(|err| StreamError::Connect {
                        to: path.display().to_string(),
                        err,
                    })?
            }
            Endpoint::Tcp(addr) => {
                let addrs: Vec<_> = addr
                    .to_socket_addrs()
                    .map_err(|err| StreamError::Resolve {
                        addr: addr.clone(),
                        err,
                    })?
                    .collect();
                let mut last = Err(StreamError::NoAddress(addr));
                for a in addrs {
                    match tcp_connect(&a, timeout) {
                        Ok(s) => {
                            last = Ok(PeerStream::Tcp(s));
                            break;
                        }
                        Err(err) => {
                            last = Err(StreamError::Connect {
                                to: a.to_string(),
                                err,
                            })
                        }
                    }
                }
                last?
            }
        };
        stream.tune();
        Ok(stream)
    }

    /// Small frames (requests, acknowledgements) must not wait for Nagle's algorithm.
    fn tune(&self) {
        match self {
            PeerStream::Tcp(s) => drop(s.set_nodelay(true)),
            PeerStream::Tls(s) => drop(s.tcp.set_nodelay(true)),
            PeerStream::Unix(_) => {}
        }
    }

    /// Turns a TCP connection into a TLS one (the handshake is the caller's);
    /// any other connection is handed back.
    pub fn upgrade(
        self,
        f: impl FnOnce(TcpStream) -> Result<TlsStream, TlsError>,
    ) -> Result<Self, TlsError> {
        match self {
            PeerStream::Tcp(s) => {
                let s = PeerStream::Tls(f(s)?);
                s.tune();
                Ok(s)
            }
            other => Ok(other),
        }
    }

    /// Caps the bytes written and not yet on their way (`SO_SNDBUF`).
    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.socket(), sockopt::SndBuf, &bytes).map_err(io::Error::from)
    }

    /// Caps the bytes received and not yet read (`SO_RCVBUF`; with TLS, at most one read
    /// buffer of records waits beside it).
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.socket(), sockopt::RcvBuf, &bytes).map_err(io::Error::from)
    }

    /// The socket beneath, for its options and for waiting on it (with TLS, the TCP socket:
    /// nothing may be written to it but records).
    fn socket(&self) -> BorrowedFd<'_> {
        match self {
            PeerStream::Tcp(s) => s.as_fd(),
            PeerStream::Unix(s) => s.as_fd(),
            PeerStream::Tls(s) => s.tcp.as_fd(),
        }
    }

    /// Makes a dead or silent peer visible within `timeout`: a write that makes no progress
    /// for that long fails (`SO_SNDTIMEO`, and on TCP `TCP_USER_TIMEOUT` for data the peer never
    /// acknowledges), and TCP keepalive probes an idle connection. Reads are bounded by the
    /// callers, who know when silence is normal.
    pub fn set_link_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => {
                s.set_write_timeout(Some(timeout))?;
                tcp_link_timeout(s, timeout)
            }
            PeerStream::Tls(s) => {
                s.tcp.set_write_timeout(Some(timeout))?;
                tcp_link_timeout(&s.tcp, timeout)
            }
            PeerStream::Unix(s) => s.set_write_timeout(Some(timeout)),
        }
    }

    /// Shuts the socket down both ways at the transport, without a TLS `close_notify` (whose
    /// write would wait for a writer blocked on the link): every thread blocked on the
    /// connection wakes with an error at once.
    pub fn abort(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.socket()),
            nix::sys::socket::Shutdown::Both,
        );
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            PeerStream::Tcp(s) => PeerStream::Tcp(s.try_clone()?),
            PeerStream::Unix(s) => PeerStream::Unix(s.try_clone()?),
            PeerStream::Tls(s) => PeerStream::Tls(s.try_clone()?),
        })
    }

    /// Shuts the connection down in one or both directions. With TLS, shutting down writing
    /// sends `close_notify` after what was written before.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.shutdown(how),
            PeerStream::Unix(s) => s.shutdown(how),
            PeerStream::Tls(s) => s.shutdown(how),
        }
    }

    /// Bounds every read; `None` waits for ever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.set_read_timeout(t),
            PeerStream::Unix(s) => s.set_read_timeout(t),
            PeerStream::Tls(s) => s.tcp.set_read_timeout(t),
        }
    }

    /// Bounds every write; `None` waits for ever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            PeerStream::Tcp(s) => s.set_write_timeout(t),
            PeerStream::Unix(s) => s.set_write_timeout(t),
            PeerStream::Tls(s) => s.tcp.set_write_timeout(t),
        }
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => s.read(buf),
            PeerStream::Unix(s) => s.read(buf),
            PeerStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => s.write(buf),
            PeerStream::Unix(s) => s.write(buf),
            PeerStream::Tls(s) => s.write_all(&[Plain::Bytes(buf)]).map(|()| buf.len()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            PeerStream::Tcp(s) => s.write_vectored(bufs),
            PeerStream::Unix(s) => s.write_vectored(bufs),
            PeerStream::Tls(s) => {
                let pieces: Vec<Plain<'_>> = bufs.iter().map(|b| Plain::Bytes(b)).collect();
                s.write_all(&pieces)?;
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PeerStream {
    /// Writes `head` then the `len` bytes of guest RAM at memfd offset `off` as one piece of
    /// the stream, so that a frame's header and its pages leave together. Over TCP the pages
    /// go with `sendfile` from the memfd: the socket takes references to them rather than a
    /// copy (the receiver's copy out of the socket is the only one on a host's loopback), and
    /// a page the guest writes meanwhile is dirty and goes again, as with any read of it. On a
    /// Unix socket, one `writev`; with TLS, sealed into records straight from guest RAM.
    pub fn write_all_guest(
        &mut self,
        head: &[u8],
        mem: &GuestMapping,
        off: u64,
        len: usize,
    ) -> io::Result<()> {
        // Bounds-checked against the mapping whichever way the pages then leave.
        let data = mem.volatile(off, len).map_err(io::Error::other)?;
        match self {
            PeerStream::Tcp(s) => send_file(s, head, mem.file(), off, len),
            PeerStream::Unix(s) => crate::link::write_all_vectored(s.as_fd(), head, &data),
            PeerStream::Tls(s) => s.write_all(&[Plain::Bytes(head), Plain::Guest(&data)]),
        }
    }

    /// `head` then `data`, guest RAM copied out of the memfd already (RAM on huge pages,
    /// which `sendfile` refuses).
    pub fn write_all_copied(&mut self, head: &[u8], data: &VolatileSlice<'_>) -> io::Result<()> {
        match self {
            PeerStream::Tls(s) => s.write_all(&[Plain::Bytes(head), Plain::Guest(data)]),
            plain => crate::link::write_all_vectored(plain.socket(), head, data),
        }
    }

    /// Waits up to `timeout` for something to read (or the end of the stream): true if there
    /// is. With TLS, plaintext already decrypted counts, which the socket cannot tell.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        if let PeerStream::Tls(s) = self {
            if s.readable_now() {
                return Ok(true);
            }
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.socket(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// `head` with `MSG_MORE` (it leaves with the pages, not in a segment of its own), then `len`
/// bytes of `file` from `off` with `sendfile`. The socket's write timeout bounds each call.
fn send_file(s: &TcpStream, mut head: &[u8], file: &File, off: u64, len: usize) -> io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    // After a connection failed, a call that had sent part of its bytes returns their count and
    // the next one EPIPE, the error itself gone (taken by that call, or by the reader of the
    // other direction): say what EPIPE means here.
    let broken = |e: nix::errno::Errno| {
        match s.take_error() {
        Ok(Some(pending)) => pending,
        _ if e == nix::errno::Errno::EPIPE => io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the TCP connection ended (the peer reset it, or it acknowledged nothing within the link timeout)",
        ),
        _ => e.into(),
    }
    };
    while !head.is_empty() {
        match send(
            s.as_raw_fd(),
            head,
            MsgFlags::from_bits_retain(libc::MSG_MORE),
        ) {
            Ok(n) => head = &head[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(broken(e)),
        }
    }
    let mut at = i64::try_from(off).map_err(io::Error::other)?;
    let end = at + i64::try_from(len).map_err(io::Error::other)?;
    while at < end {
        let left = (end - at) as usize;
        match nix::sys::sendfile::sendfile64(s, file, Some(&mut at), left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(broken(e)),
        }
    }
    Ok(())
}

/// Where a destination waits for its source.
#[derive(Debug)]
pub enum PeerListener {
    /// A TCP port.
    Tcp(TcpListener),
    /// A Unix socket, removed again when the listener goes.
    Unix(UnixListener, PathBuf),
}

impl PeerListener {
    /// Binds `uri` (`tcp:HOST:0` picks a port), non-blocking.
    pub fn bind(uri: &str) -> Result<Self, StreamError> {
        let l = match Endpoint::parse(uri)? {
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(&addr).map_err(|err| StreamError::Listen {
                    on: addr.clone(),
                    err,
                })?;
                // Before any connection comes: accepted ones take the listener's algorithm.
                crate::congestion::apply(socket2::SockRef::from(&l));
                PeerListener::Tcp(l)
            }
            Endpoint::Unix(path) => PeerListener::Unix(
                UnixListener::bind(&path).map_err(|err| StreamError::Listen {
                    on: path.display().to_string(),
                    err,
                })?,
                path,
            ),
        };
        match &l {
            PeerListener::Tcp(t) => t.set_nonblocking(true),
            PeerListener::Unix(u, _) => u.set_nonblocking(true),
        }?;
        Ok(l)
    }

    /// The URI a source connects to.
    pub fn uri(&self) -> Result<String, StreamError> {
        match self {
            PeerListener::Tcp(t) => Ok(format!("tcp:{}", t.local_addr()?)),
            PeerListener::Unix(_, path) => Ok(format!("unix:{}", path.display())),
        }
    }

    /// Accepts a connection (`WouldBlock` when none waits), made blocking, and a name for logs.
    pub fn accept(&self) -> io::Result<(PeerStream, String)> {
        let (s, from) = match self {
            PeerListener::Tcp(t) => {
                let (s, a) = t.accept()?;
                s.set_nonblocking(false)?;
                (PeerStream::Tcp(s), a.to_string())
            }
            PeerListener::Unix(u, path) => {
                let (s, _) = u.accept()?;
                s.set_nonblocking(false)?;
                (PeerStream::Unix(s), path.display().to_string())
            }
        };
        s.tune();
        Ok((s, from))
    }
}

impl AsFd for PeerListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            PeerListener::Tcp(t) => t.as_fd(),
            PeerListener::Unix(u, _) => u.as_fd(),
        }
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        if let PeerListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM of `pages` pages, page `p` filled with byte `p * 7 + 1`.
    fn guest(pages: u64) -> GuestMapping {
        use std::os::unix::fs::FileExt;
        let file = crate::testutil::sealed_memfd(pages * 4096);
        for p in 0..pages {
            file.write_all_at(&[(p * 7 + 1) as u8; 4096], p * 4096)
                .unwrap();
        }
        GuestMapping::new(file.into(), crate::testutil::blocks(&[pages])).unwrap()
    }

    #[test]
    fn guest_pages_leave_with_their_header_over_tcp_and_unix() {
        let mem = guest(2048);
        // Over TCP the pages go with sendfile: 6 MiB from page 3, after a header.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = PeerStream::Tcp(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let (mut b, _) = l.accept().unwrap();
        let (off, len) = (3 * 4096, 1536 * 4096);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 5 + len];
            b.read_exact(&mut got).unwrap();
            got
        });
        a.write_all_guest(b"head!", &mem, off, len).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(&got[..5], b"head!");
        for (i, page) in got[5..].chunks(4096).enumerate() {
            let want = ((3 + i as u64) * 7 + 1) as u8;
            assert!(page.iter().all(|&x| x == want), "page {}", 3 + i);
        }
        // On a Unix socket, one writev of the same.
        let (x, mut y) = UnixStream::pair().unwrap();
        let mut x = PeerStream::Unix(x);
        x.write_all_guest(b"h", &mem, 4096, 4096).unwrap();
        let mut got = vec![0u8; 1 + 4096];
        y.read_exact(&mut got).unwrap();
        assert!(got[0] == b'h' && got[1..].iter().all(|&v| v == 8));
        // A range outside guest RAM is refused before anything is written.
        assert!(x.write_all_guest(b"h", &mem, 2047 * 4096, 8192).is_err());
        assert!(a.write_all_guest(b"h", &mem, 2047 * 4096, 8192).is_err());
    }

    #[test]
    fn uris() {
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:4444").unwrap(),
            (Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp:[::1]:4444").unwrap(),
            (Endpoint::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock").unwrap(),
            (Endpoint::Unix("/run/m.sock".into()))
        );
        for bad in [
            "unix:",
            "tcp:host",
            "tcp::80",
            "udp:1.2.3.4:5",
            "tcp:h:99999",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(StreamError::BadUri { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn unix_listener_connects_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("umem-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = format!("unix:{}", dir.join("m.sock").display());
        let l = PeerListener::bind(&uri).unwrap();
        assert_eq!(l.uri().unwrap(), uri);
        let mut c = PeerStream::connect(&uri, Duration::from_secs(1)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"page").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"page");
        drop(l);
        assert!(!dir.join("m.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn both_ends_of_a_migration_connection_run_umemds_congestion_control() {
        use crate::congestion::algorithm_of;
        use socket2::SockRef;
        let l = PeerListener::bind("tcp:127.0.0.1:0").unwrap();
        let c = PeerStream::connect(&l.uri().unwrap(), Duration::from_secs(1)).unwrap();
        let a = loop {
            match l.accept() {
                Ok((a, _)) => break a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let (PeerStream::Tcp(c), PeerStream::Tcp(a)) = (&c, &a) else {
            panic!("not TCP: {c:?} {a:?}")
        };
        // This process's policy is the default: CUBIC, or Reno where CUBIC is refused.
        let ours = algorithm_of(SockRef::from(c)).unwrap();
        assert!(ours == "cubic" || ours == "reno", "{ours}");
        assert_eq!(algorithm_of(SockRef::from(a)).unwrap(), ours);
    }
}
