//! Framed connections: writing messages, and reader threads that turn a connection into a
//! channel of decoded messages so a session can wait on several sources at once.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use proto::frame;
use proto::local::LocalMessage;
use proto::peer::PeerMessage;

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

/// Writes `a` then `b` with as few syscalls as the kernel allows.
pub fn write_all_vectored<W: Write>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    Ok(())
}

/// What a reader thread delivers: a message, or why the connection ended.
pub type Delivery<M> = Result<M, String>;

/// Handles some messages in the reader thread itself instead of passing them on: `Ok(None)`
/// means handled, `Ok(Some(m))` passes `m` on, `Err` ends the connection with that reason.
pub type Intercept<M> = Arc<Mutex<Option<Box<dyn FnMut(M) -> Result<Option<M>, String> + Send>>>>;

fn spawn_reader<R, M, F>(
    name: &str,
    mut conn: R,
    decode: F,
    intercept: Intercept<M>,
    tx: Sender<Delivery<M>>,
) where
    R: Read + Send + 'static,
    M: Send + 'static,
    F: Fn(u8, &[u8]) -> Result<M, proto::DecodeError> + Send + 'static,
{
    let _ = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut body = Vec::new();
            loop {
                let item = match frame::read(&mut conn, &mut body) {
                    Ok(p) => decode(p.kind, &body).map_err(|e| format!("malformed message: {e}")),
                    Err(e) if e.is_eof() => Err("connection closed".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let item = match item {
                    Ok(m) => match intercept.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        Some(f) => match f(m) {
                            Ok(None) => continue,
                            Ok(Some(m)) => Ok(m),
                            Err(e) => Err(e),
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
        LocalMessage::decode,
        Arc::new(Mutex::new(None)),
        tx,
    );
    rx
}

/// Reads peer messages in a thread; `Pages` frames are refused (the source never receives any).
/// Messages that `intercept` handles never reach the channel.
pub fn peer_reader(
    conn: PeerStream,
    intercept: Intercept<PeerMessage>,
) -> Receiver<Delivery<PeerMessage>> {
    let (tx, rx) = mpsc::channel();
    spawn_reader(
        "peer-reader",
        conn,
        |k, b| match k {
            proto::peer::kind::PAGES => Err(proto::DecodeError::UnknownKind(k)),
            _ => PeerMessage::decode(k, b),
        },
        intercept,
        tx,
    );
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dribble(Vec<u8>);
    impl Write for Dribble {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(3);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_write_survives_short_writes() {
        let mut w = Dribble(Vec::new());
        write_all_vectored(&mut w, b"header", b"payload-bytes").unwrap();
        assert_eq!(w.0, b"headerpayload-bytes");
    }

    #[test]
    fn reader_reports_garbage_and_close() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rx = local_reader(b);
        send_local(&mut a, &LocalMessage::Cancel).unwrap();
        a.write_all(&[1, 0, 0, 0, 0xee, 0]).unwrap();
        assert_eq!(rx.recv().unwrap(), Ok(LocalMessage::Cancel));
        let e = rx.recv().unwrap().unwrap_err();
        assert!(e.contains("unknown message kind"), "{e}");
    }
}
