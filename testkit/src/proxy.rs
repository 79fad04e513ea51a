//! A fault-injecting TCP proxy for the migration stream between two umemds (there is no netem
//! here). It forwards whole frames in both directions and, on request, cuts every connection
//! when a frame of a given kind passes, dropping that frame: the way to lose exactly one
//! message of a protocol exchange. While it is down it closes every new connection at once.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
        let target = uri
            .strip_prefix("tcp:")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not a tcp: uri: {uri}"));
        Self::start(target)
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

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
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

/// Forwards whole frames from `from` to `to` until either side closes or the link is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Direction, shared: Arc<Shared>) {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if from.read_exact(&mut prefix).is_err() || shared.down.load(Ordering::SeqCst) {
            break;
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
        if to.write_all(&prefix).is_err() {
            break;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            if from.read_exact(&mut buf[..n]).is_err() || to.write_all(&buf[..n]).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            left -= n;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
