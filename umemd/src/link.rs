//! Framed connections: writing messages, and reader threads that turn a connection into a
//! channel of decoded messages so a session can wait on several sources at once.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use proto::frame;
use proto::local::LocalMessage;
use proto::peer::PeerMessage;
use vm_memory::VolatileSlice;

use crate::stream::PeerStream;

/// Writes one local message.
pub fn send_local(conn: &mut UnixStream, msg: &LocalMessage) -> io::Result<()> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    conn.write_all(&buf)
}

/// Writes one peer message.
pub fn send_peer(conn: &mut PeerStream, msg: &PeerMessage) -> io::Result<()> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    conn.write_all(&buf)
}

/// Writes `head` then `data` (guest RAM) to the socket or file `fd` with as few syscalls as the
/// kernel allows, one `writev` each, so that a frame's header and its pages leave together.
pub fn write_all_vectored(
    fd: BorrowedFd<'_>,
    head: &[u8],
    data: &VolatileSlice<'_>,
) -> io::Result<()> {
    write_all_with(head, data, |h, d| writev(fd, h, d))
}

/// The loop of [`write_all_vectored`] around `write_once`, which writes a prefix of `head`
/// followed by `data` and says how many bytes it wrote.
fn write_all_with(
    mut head: &[u8],
    data: &VolatileSlice<'_>,
    mut write_once: impl FnMut(&[u8], &VolatileSlice<'_>) -> io::Result<usize>,
) -> io::Result<()> {
    let mut data = *data;
    while !head.is_empty() || !data.is_empty() {
        let n = match write_once(head, &data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n >= head.len() {
            data = data.offset(n - head.len()).map_err(io::Error::other)?;
            head = &[];
        } else {
            head = &head[n..];
        }
    }
    Ok(())
}

/// One `writev(2)` of `head` then `data`.
fn writev(fd: BorrowedFd<'_>, head: &[u8], data: &VolatileSlice<'_>) -> io::Result<usize> {
    let guard = data.ptr_guard();
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: guard.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        },
    ];
    // SAFETY: both iovecs describe live memory for the duration of the call: `head` is a
    // borrowed slice and `data` a bounds-checked view of a mapping that outlives it. The kernel
    // only reads them (writev copies from user memory); a concurrent write by the guest can tear
    // what is sent, never break an invariant of ours, and no Rust reference to guest RAM is
    // formed on the way.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Why a frame did not arrive by its deadline.
#[derive(Debug, thiserror::Error)]
pub enum ReadByError {
    /// The deadline passed first.
    #[error("timed out")]
    Timeout,
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading failed.
    #[error("{0}")]
    Io(io::Error),
    /// The frame's prefix is invalid.
    #[error("{0}")]
    Frame(frame::FrameError),
    /// The frame is longer than any message expected here.
    #[error("a frame of {len} bytes where at most {limit} are expected")]
    TooLong {
        /// Its announced length.
        len: u32,
        /// The most expected.
        limit: u32,
    },
}

/// The longest frame a peer may send before it is admitted: the authentication messages and
/// the first message are all far shorter, so an unauthenticated peer costs no large buffer.
pub const MAX_OPENING_FRAME: u32 = 256;

/// Reads one frame into `body`, all of it before `deadline`: a peer that trickles bytes cannot
/// stretch the wait, as a timeout per read would let it. Heartbeats are skipped (a peer waiting
/// for an answer keeps the link alive meanwhile). A frame longer than `limit` is refused
/// before its body is read. Leaves a read timeout set on `peer`.
pub fn read_frame_by(
    peer: &mut PeerStream,
    body: &mut Vec<u8>,
    deadline: std::time::Instant,
    limit: u32,
) -> Result<proto::FramePrefix, ReadByError> {
    let mut read_by = |buf: &mut [u8]| -> Result<(), ReadByError> {
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ReadByError::Timeout);
            }
            peer.set_read_timeout(Some(left)).map_err(ReadByError::Io)?;
            match peer.read(&mut buf[done..]) {
                Ok(0) => return Err(ReadByError::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(ReadByError::Timeout),
                Err(e) => return Err(ReadByError::Io(e)),
            }
        }
        Ok(())
    };
    loop {
        let mut prefix = [0u8; proto::PREFIX_LEN];
        read_by(&mut prefix)?;
        let p = proto::FramePrefix::parse(&prefix).map_err(ReadByError::Frame)?;
        if p.len > limit {
            return Err(ReadByError::TooLong { len: p.len, limit });
        }
        body.resize(p.len as usize, 0);
        read_by(body)?;
        if p.kind != proto::peer::kind::HEARTBEAT {
            return Ok(p);
        }
    }
}

/// Why a reader thread's connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// A frame arrived whose message does not decode.
    #[error("malformed message: {0}")]
    Malformed(#[from] proto::DecodeError),
    /// Reading a frame failed.
    #[error("{0}")]
    Frame(frame::FrameError),
    /// The interceptor handling a message failed; its reason.
    #[error("{0}")]
    Handler(HandlerError),
    /// Nothing arrived, not even a heartbeat, for the link timeout.
    #[error("no message for {0} ms (link timeout): the peer or the link is dead")]
    Silent(u128),
}

/// Whether a read failed because its timeout expired.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Why an interceptor failed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a reader thread delivers: a message, or why the connection ended.
pub type Delivery<M> = Result<M, LinkError>;

/// Handles some messages in the reader thread itself instead of passing them on: `Ok(None)`
/// means handled, `Ok(Some(m))` passes `m` on, `Err` ends the connection with that reason.
pub type Intercept<M> =
    Arc<Mutex<Option<Box<dyn FnMut(M) -> Result<Option<M>, HandlerError> + Send>>>>;

/// How a reader treats a read that times out: the link is dead after `after`, and `then`
/// runs before that is reported.
struct Silence {
    after: std::time::Duration,
    then: Box<dyn FnOnce() + Send>,
}

/// `decode` returns `Ok(None)` for a message that only proves the link alive (a heartbeat). A
/// read that times out (the caller set the connection's read timeout to the link timeout,
/// `silence`) ends the connection as [`LinkError::Silent`].
fn spawn_reader<R, M, F>(
    name: &str,
    mut conn: R,
    decode: F,
    intercept: Intercept<M>,
    tx: Sender<Delivery<M>>,
    mut silence: Option<Silence>,
) where
    R: Read + Send + 'static,
    M: Send + 'static,
    F: Fn(u8, &[u8]) -> Result<Option<M>, proto::DecodeError> + Send + 'static,
{
    let _ = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // A reader sleeps until a message comes; a source's peer reader serves page
            // requests (`intercept`), each of which a vCPU waits for.
            crate::priority::shorten_time_slice();
            let mut body = Vec::new();
            loop {
                let item = match frame::read(&mut conn, &mut body) {
                    Ok(p) => match decode(p.kind, &body) {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => continue,
                        Err(e) => Err(LinkError::Malformed(e)),
                    },
                    Err(e) if e.is_eof() => Err(LinkError::Closed),
                    Err(frame::FrameError::Io(e)) if is_timeout(&e) && silence.is_some() => {
                        let after = silence.take().map_or(0, |s| {
                            (s.then)();
                            s.after.as_millis()
                        });
                        Err(LinkError::Silent(after))
                    }
                    Err(e) => Err(LinkError::Frame(e)),
                };
                let item = match item {
                    Ok(m) => match intercept.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        Some(f) => match f(m) {
                            Ok(None) => continue,
                            Ok(Some(m)) => Ok(m),
                            Err(e) => Err(LinkError::Handler(e)),
                        },
                        None => Ok(m),
                    },
                    Err(e) => Err(e),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
}

/// Reads local messages from the VMM in a thread.
pub fn local_reader(conn: UnixStream) -> Receiver<Delivery<LocalMessage>> {
    let (tx, rx) = mpsc::channel();
    spawn_reader(
        "vmm-reader",
        conn,
        |k, b| LocalMessage::decode(k, b).map(Some),
        Arc::new(Mutex::new(None)),
        tx,
        None,
    );
    rx
}

/// Reads peer messages in a thread; `Pages` frames are refused (the source never receives any).
/// Messages that `intercept` handles never reach the channel, nor do heartbeats. A peer silent
/// for `link_timeout` ends the connection ([`LinkError::Silent`]).
pub fn peer_reader(
    conn: PeerStream,
    intercept: Intercept<PeerMessage>,
    link_timeout: std::time::Duration,
) -> io::Result<Receiver<Delivery<PeerMessage>>> {
    conn.set_read_timeout(Some(link_timeout))?;
    // A silent link is dead: shutting it down wakes a writer blocked on it (its buffers full
    // behind a stalled link), so the writer's side notices within the link timeout too.
    let handle = conn.try_clone()?;
    let silence = Silence {
        after: link_timeout,
        then: Box::new(move || handle.abort()),
    };
    let (tx, rx) = mpsc::channel();
    spawn_reader(
        "peer-reader",
        conn,
        |k, b| match k {
            proto::peer::kind::PAGES => Err(proto::DecodeError::UnknownKind(k)),
            _ => PeerMessage::decode(k, b).map(|m| (m != PeerMessage::Heartbeat).then_some(m)),
        },
        intercept,
        tx,
        Some(silence),
    );
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_write_survives_short_writes() {
        let mut payload = *b"payload-bytes";
        let data = VolatileSlice::from(&mut payload[..]);
        let mut out = Vec::new();
        write_all_with(b"header", &data, |h, d| {
            // At most 3 bytes a call, across the boundary between the two parts.
            let mut b = [0u8; 3];
            let from_head = h.len().min(3);
            b[..from_head].copy_from_slice(&h[..from_head]);
            let from_data = d.copy_to(&mut b[from_head..]);
            out.extend_from_slice(&b[..from_head + from_data]);
            Ok(from_head + from_data)
        })
        .unwrap();
        assert_eq!(out, b"headerpayload-bytes");
        let e = write_all_with(b"h", &data, |_, _| Ok(0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn vectored_write_reaches_a_socket() {
        use std::os::fd::AsFd;
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let want = payload.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let data = VolatileSlice::from(&mut payload[..]);
        write_all_vectored(a.as_fd(), b"head", &data).unwrap();
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..] == want[..], "payload differs");
    }

    #[test]
    fn reader_reports_garbage_and_close() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rx = local_reader(b);
        send_local(&mut a, &LocalMessage::Cancel).unwrap();
        a.write_all(&[1, 0, 0, 0, 0xee, 0]).unwrap();
        assert_eq!(rx.recv().unwrap().unwrap(), LocalMessage::Cancel);
        match rx.recv().unwrap() {
            Err(LinkError::Malformed(proto::DecodeError::UnknownKind(0xee))) => {}
            other => panic!("expected a malformed message, got {other:?}"),
        }
        drop(a);
        assert!(rx.recv().is_err(), "the reader stops after an error");
    }

    #[test]
    fn a_silent_peer_also_wakes_a_writer_blocked_on_the_link() {
        use std::net::{TcpListener, TcpStream};
        use std::time::{Duration, Instant};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // The peer neither reads nor writes: our writes fill the buffers and then block.
        let (_peer, _) = listener.accept().unwrap();
        let conn = PeerStream::Tcp(ours);
        let mut writer = conn.try_clone().unwrap();
        let timeout = Duration::from_millis(300);
        let rx = peer_reader(conn, Arc::new(Mutex::new(None)), timeout).unwrap();
        let t0 = Instant::now();
        let (done, wrote) = mpsc::channel();
        std::thread::spawn(move || {
            let chunk = vec![0u8; 1 << 20];
            loop {
                if let Err(e) = writer.write_all(&chunk) {
                    let _ = done.send((e, t0.elapsed()));
                    return;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Err(LinkError::Silent(300))) => {}
            other => panic!("expected silence, got {other:?}"),
        }
        // No write timeout was set: only the reader's shutdown can end the write.
        let (e, took) = wrote
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer is still blocked");
        assert!(
            took < Duration::from_secs(5),
            "the writer woke after {took:?}: {e}"
        );
    }
}
