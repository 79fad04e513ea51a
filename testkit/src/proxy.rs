//! A fault-injecting TCP proxy for the migration stream between two umemds (there is no netem
//! here). It forwards whole frames in both directions and, on request:
//! - cuts every connection when a frame of a given kind passes, dropping that frame: the way to
//!   lose exactly one message of a protocol exchange;
//! - cuts every connection now; while it is down it closes every new connection at once;
//! - stalls: holds every byte without closing anything, as a partitioned link does;
//! - delays each frame, or caps the bandwidth of each direction;
//! - keeps a copy of one frame (a real machine state, say, to replay elsewhere).
//!
//! In front of a TLS connection there are no frames to see: [`FaultProxy::bytes_in_front_of`]
//! forwards bytes as they come, and only cuts, stalls, latency and bandwidth apply.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of a frame's prefix: `u32` LE body length, `u8` kind.
const PREFIX_LEN: usize = 5;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the source umemd (the connecting side) to the destination.
    ToDestination,
    /// From the destination umemd back to the source.
    ToSource,
}

#[derive(Default)]
struct Shared {
    /// Cut when a frame of this kind travels this way (once).
    cut_at: Mutex<Option<(Direction, u8)>>,
    /// The link is down: connections are cut and new ones closed.
    down: AtomicBool,
    /// A `cut_at` rule fired.
    fired: AtomicBool,
    /// Every open socket, both sides, to shut down on a cut.
    sockets: Mutex<Vec<TcpStream>>,
    /// Frames forwarded, by direction.
    frames: Mutex<Vec<(Direction, u8)>>,
    /// Nothing is forwarded while set (connections stay open).
    stalled: AtomicBool,
    /// Added to every frame, in microseconds.
    latency_us: AtomicU64,
    /// Bytes per second in each direction, 0 for no cap.
    bandwidth: AtomicU64,
    /// Forward bytes as they come instead of whole frames (the stream is encrypted).
    bytes: AtomicBool,
    /// Copy the body of the next frame of this kind travelling this way (once).
    capture: Mutex<Option<(Direction, u8)>>,
    /// The body copied for `capture`, once all of it has passed.
    captured: Mutex<Option<Vec<u8>>>,
    stop: AtomicBool,
}

impl Shared {
    fn cut_all(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A proxy on `127.0.0.1`, forwarding to one target address.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        listener.set_nonblocking(true).expect("nonblocking proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, target, sh));
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Starts a proxy in front of a destination that listens on `uri` (`tcp:HOST:PORT`).
    pub fn in_front_of(uri: &str) -> FaultProxy {
        Self::start(Self::target(uri))
    }

    /// Starts a proxy that forwards bytes, not frames, in front of a destination that listens
    /// on `uri`: for TLS connections, whose frames it cannot see. Frame rules never fire.
    pub fn bytes_in_front_of(uri: &str) -> FaultProxy {
        let p = Self::start(Self::target(uri));
        p.shared.bytes.store(true, Ordering::SeqCst);
        p
    }

    fn target(uri: &str) -> SocketAddr {
        uri.strip_prefix("tcp:")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not a tcp: uri: {uri}"))
    }

    /// The uri the source should migrate to.
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    /// Cuts every connection (and keeps the link down) when the next frame of `kind` travels
    /// in `dir`; that frame is not delivered.
    pub fn cut_at_frame(&self, dir: Direction, kind: u8) {
        *self.shared.cut_at.lock().unwrap() = Some((dir, kind));
    }

    /// Whether a [`Self::cut_at_frame`] rule fired.
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Cuts every connection now; new ones are closed until [`Self::restore`].
    pub fn cut(&self) {
        self.shared.cut_all();
    }

    /// Lets new connections through again, and ends a stall.
    pub fn restore(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// Stops forwarding without closing anything: both sides see a silent link.
    pub fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    /// Delays every frame by `latency` (each direction on its own).
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// Caps each direction at `bytes_per_sec` (0: no cap).
    pub fn set_bandwidth(&self, bytes_per_sec: u64) {
        self.shared.bandwidth.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Keeps a copy of the body of the next frame of `kind` travelling in `dir`; the frame is
    /// forwarded as usual.
    pub fn capture_frame(&self, dir: Direction, kind: u8) {
        *self.shared.capture.lock().unwrap() = Some((dir, kind));
    }

    /// The body kept by [`Self::capture_frame`], once the whole frame has passed.
    pub fn captured(&self) -> Option<Vec<u8>> {
        self.shared.captured.lock().unwrap().clone()
    }

    /// The kinds of the frames forwarded in `dir` so far, in order.
    pub fn frames(&self, dir: Direction) -> Vec<u8> {
        self.shared
            .frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, k)| *k)
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cut_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if shared.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                shared.sockets.lock().unwrap().extend([c3, s3]);
                let sh = shared.clone();
                std::thread::spawn(move || pump(client, server, Direction::ToDestination, sh));
                let sh = shared.clone();
                std::thread::spawn(move || pump(s2, c2, Direction::ToSource, sh));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits while the link is stalled; false once it is down.
fn wait_while_stalled(shared: &Shared) -> bool {
    while shared.stalled.load(Ordering::SeqCst) {
        if shared.down.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    !shared.down.load(Ordering::SeqCst)
}

/// Forwards whole frames from `from` to `to` until either side closes or the link is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Direction, shared: Arc<Shared>) {
    if shared.bytes.load(Ordering::SeqCst) {
        return pump_bytes(from, to, &shared);
    }
    let mut prefix = [0u8; PREFIX_LEN];
    let mut buf = vec![0u8; 64 << 10];
    // Bandwidth accounting: bytes forwarded since `since`.
    let (mut since, mut sent) = (Instant::now(), 0u64);
    loop {
        if from.read_exact(&mut prefix).is_err() || !wait_while_stalled(&shared) {
            break;
        }
        let latency = shared.latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            std::thread::sleep(Duration::from_micros(latency));
        }
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let kind = prefix[4];
        {
            let mut rule = shared.cut_at.lock().unwrap();
            if *rule == Some((dir, kind)) {
                *rule = None;
                shared.fired.store(true, Ordering::SeqCst);
                drop(rule);
                shared.cut_all();
                break;
            }
        }
        shared.frames.lock().unwrap().push((dir, kind));
        let mut copy = {
            let mut rule = shared.capture.lock().unwrap();
            (*rule == Some((dir, kind))).then(|| {
                *rule = None;
                Vec::with_capacity(len)
            })
        };
        if to.write_all(&prefix).is_err() {
            break;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(64 << 10);
            if from.read_exact(&mut buf[..n]).is_err()
                || !wait_while_stalled(&shared)
                || to.write_all(&buf[..n]).is_err()
            {
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            if let Some(c) = copy.as_mut() {
                c.extend_from_slice(&buf[..n]);
            }
            left -= n;
            let cap = shared.bandwidth.load(Ordering::SeqCst);
            if cap > 0 {
                sent += n as u64;
                let due = Duration::from_secs_f64(sent as f64 / cap as f64);
                if let Some(wait) = due.checked_sub(since.elapsed()) {
                    std::thread::sleep(wait);
                }
                if since.elapsed() > Duration::from_secs(1) {
                    (since, sent) = (Instant::now(), 0);
                }
            }
        }
        if let Some(c) = copy {
            *shared.captured.lock().unwrap() = Some(c);
        }
    }
    // The sender is done (or the link was cut): pass its end on, as TCP does, without cutting
    // what still travels the other way.
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards bytes as they come from `from` to `to`, with the same cuts, stalls, latency and
/// bandwidth as [`pump`].
fn pump_bytes(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    let (mut since, mut sent) = (Instant::now(), 0u64);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !wait_while_stalled(shared) {
            break;
        }
        let latency = shared.latency_us.load(Ordering::SeqCst);
        if latency > 0 {
            std::thread::sleep(Duration::from_micros(latency));
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
        let cap = shared.bandwidth.load(Ordering::SeqCst);
        if cap > 0 {
            sent += n as u64;
            let due = Duration::from_secs_f64(sent as f64 / cap as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
            if since.elapsed() > Duration::from_secs(1) {
                (since, sent) = (Instant::now(), 0);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(body);
        f
    }

    /// A server that accepts one connection and hands it back.
    fn listen_once() -> (SocketAddr, JoinHandle<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        (addr, std::thread::spawn(move || l.accept().unwrap().0))
    }

    #[test]
    fn forwards_frames_and_cuts_at_the_chosen_one() {
        let (addr, accepted) = listen_once();
        let proxy = FaultProxy::start(addr);
        proxy.cut_at_frame(Direction::ToDestination, 7);
        let mut client = TcpStream::connect(proxy.addr).unwrap();
        let mut server = accepted.join().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(&frame(1, b"hello")).unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &frame(1, b"hello")[..]);
        client.write_all(&frame(7, b"lost")).unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
        assert!(proxy.fired());
        assert_eq!(proxy.frames(Direction::ToDestination), vec![1]);
        // Down: a new connection is closed at once; restored: it goes through.
        let mut c2 = TcpStream::connect(proxy.addr).unwrap();
        c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c2.read(&mut [0u8; 1]).unwrap_or(0), 0);
        let (addr2, _) = listen_once();
        drop(proxy);
        let proxy = FaultProxy::start(addr2);
        proxy.cut();
        proxy.restore();
        assert!(TcpStream::connect(proxy.addr).is_ok());
    }

    #[test]
    fn a_captured_frame_is_kept_and_forwarded() {
        let (addr, accepted) = listen_once();
        let proxy = FaultProxy::start(addr);
        proxy.capture_frame(Direction::ToDestination, 5);
        let mut client = TcpStream::connect(proxy.addr).unwrap();
        let mut server = accepted.join().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let big = vec![0x5a; 200 << 10];
        let sent: Vec<u8> = [frame(4, b"before"), frame(5, &big), frame(5, b"later")].concat();
        client.write_all(&sent).unwrap();
        let mut got = vec![0u8; sent.len()];
        server.read_exact(&mut got).unwrap();
        assert!(got == sent, "the proxy changed what it forwarded");
        assert_eq!(proxy.captured(), Some(big));
    }

    #[test]
    fn a_stall_holds_every_byte_until_restored() {
        let (addr, accepted) = listen_once();
        let proxy = FaultProxy::start(addr);
        let mut client = TcpStream::connect(proxy.addr).unwrap();
        let mut server = accepted.join().unwrap();
        proxy.stall();
        client.write_all(&frame(2, b"held")).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = [0u8; 9];
        assert!(
            server.read_exact(&mut got).is_err(),
            "a stalled link let a frame through"
        );
        proxy.restore();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &frame(2, b"held")[..]);
    }

    #[test]
    fn bytes_pass_as_they_come_and_a_cut_closes_them() {
        let (addr, accepted) = listen_once();
        let proxy = FaultProxy::bytes_in_front_of(&format!("tcp:{addr}"));
        let mut client = TcpStream::connect(proxy.addr).unwrap();
        let mut server = accepted.join().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A TLS record header read as a frame prefix would announce 66 KiB.
        client
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2])
            .unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2]);
        proxy.cut();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
    }

    #[test]
    fn latency_delays_each_frame() {
        let (addr, accepted) = listen_once();
        let proxy = FaultProxy::start(addr);
        proxy.set_latency(Duration::from_millis(50));
        let mut client = TcpStream::connect(proxy.addr).unwrap();
        let mut server = accepted.join().unwrap();
        let t0 = Instant::now();
        client.write_all(&frame(3, b"x")).unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t0.elapsed()
        );
    }
}
