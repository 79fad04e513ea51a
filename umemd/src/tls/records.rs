//! The TLS 1.3 record layer of an established connection, run in the threads that read and
//! write it (RFC 8446, section 5).
//!
//! rustls runs the handshake, then hands over the traffic keys and a
//! [`rustls::kernel::KernelConnection`] that derives the next keys at a key update: the split
//! rustls offers for kernel TLS. Kernel TLS is not available everywhere (`TCP_ULP "tls"` fails
//! where the `tls` module is absent), so umemd seals and opens the records itself with the same
//! AEAD rustls uses (`ring`). Each direction has its own state behind its own lock, so the
//! thread that streams pages and the thread that reads requests never wait for each other,
//! no thread sits between umemd and the socket, and received records are decrypted in place
//! in the buffer the kernel copied them to.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{AlertDescription, ConnectionTrafficSecrets};
use vm_memory::VolatileSlice;

/// Largest plaintext of one record.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext of one record a peer may send: plaintext, content type, padding, tag.
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag of every suite offered.
const TAG: usize = 16;
/// Outer type of every TLS 1.3 record, and inner type of application data.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Records sealed under one key before it is replaced: far below the AES-GCM confidentiality
/// limit (2^24.5 records), so a migration of any size keeps within it.
const REKEY_AFTER: u64 = 1 << 23;
/// Ciphertext gathered before it is written to the socket: one `write` per batch of records.
const WRITE_BATCH: usize = 256 << 10;
/// Ciphertext read per `read` at most.
const READ_BUFFER: usize = 256 << 10;

/// Derives the next traffic keys at a key update: rustls's
/// [`rustls::kernel::KernelConnection`], for either role.
pub(crate) trait NextKeys: Send {
    /// Keys for what this side sends next.
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
    /// Keys for what the peer sends next.
    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error>;
}

/// Asks for the next key of one direction, when a key update comes.
pub(crate) type KeySource<'a> =
    &'a mut dyn FnMut() -> Result<ConnectionTrafficSecrets, rustls::Error>;

impl<D> NextKeys for rustls::kernel::KernelConnection<D>
where
    rustls::kernel::KernelConnection<D>: Send,
{
    fn next_tx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_tx_secret().map(|(_, s)| s)
    }

    fn next_rx(&mut self) -> Result<ConnectionTrafficSecrets, rustls::Error> {
        self.update_rx_secret().map(|(_, s)| s)
    }
}

/// One direction's key: the AEAD key, the static IV and the record sequence number.
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl DirectionKey {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            #[allow(unreachable_patterns)]
            _ => {
                return Err(io::Error::other(
                    "TLS: the negotiated cipher suite is not supported",
                ))
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS: a traffic key of the wrong length"))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS: a traffic IV of the wrong length"))?;
        Ok(DirectionKey {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record, which it uses up (RFC 8446, 5.3).
    fn next_nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// A piece of plaintext to send: bytes of umemd's, or guest RAM, read through volatile copies.
#[derive(Clone, Copy)]
pub(crate) enum Plain<'a> {
    /// umemd's own bytes.
    Bytes(&'a [u8]),
    /// Guest RAM.
    Guest(&'a VolatileSlice<'a>),
}

impl Plain<'_> {
    fn len(&self) -> usize {
        match self {
            Plain::Bytes(b) => b.len(),
            Plain::Guest(g) => g.len(),
        }
    }

    /// Copies `dst.len()` bytes from `at` into `dst`.
    fn copy_out(&self, at: usize, dst: &mut [u8]) -> io::Result<()> {
        match self {
            Plain::Bytes(b) => dst.copy_from_slice(&b[at..at + dst.len()]),
            Plain::Guest(g) => {
                let n = g
                    .subslice(at, dst.len())
                    .map_err(io::Error::other)?
                    .copy_to(dst);
                if n != dst.len() {
                    return Err(io::Error::other("a short copy of guest RAM"));
                }
            }
        }
        Ok(())
    }
}

/// The sending direction: seals plaintext into records and writes them to the socket.
pub(crate) struct Sealer {
    key: DirectionKey,
    out: Vec<u8>,
    /// Set once a write failed part way: the peer may have part of a record, so nothing sent
    /// after it could be read. Every later write fails with it.
    broken: Option<String>,
    /// The peer asked for a key update of ours: the next record goes under a new key.
    pub(crate) update_requested: bool,
    rekey_after: u64,
}

impl Sealer {
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        Ok(Sealer {
            key: DirectionKey::new(seq, secrets)?,
            out: Vec::with_capacity(WRITE_BATCH + MAX_CIPHERTEXT + HEADER),
            broken: None,
            update_requested: false,
            rekey_after: REKEY_AFTER,
        })
    }

    #[cfg(test)]
    pub(crate) fn rekey_after(&mut self, records: u64) {
        self.rekey_after = records;
    }

    #[cfg(test)]
    pub(crate) fn seq(&self) -> u64 {
        self.key.seq
    }

    /// Seals one record of inner type `kind` whose plaintext `fill` writes into the slice it
    /// is given (exactly `len` bytes), and appends it to the batch.
    fn seal(
        &mut self,
        kind: u8,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let start = self.out.len();
        let body = len + 1 + TAG;
        let header = [
            APPLICATION_DATA,
            3,
            3,
            (body >> 8) as u8,
            (body & 0xff) as u8,
        ];
        self.out.extend_from_slice(&header);
        self.out.resize(start + HEADER + len, 0);
        fill(&mut self.out[start + HEADER..])?;
        self.out.push(kind);
        let nonce = self.key.next_nonce();
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.out[start + HEADER..])
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Replaces this side's key when it has sealed enough records, or when the peer asked:
    /// a `key_update` under the old key tells the peer, then the new key is used.
    fn maybe_rekey(&mut self, next: KeySource<'_>) -> io::Result<()> {
        if self.key.seq < self.rekey_after && !self.update_requested {
            return Ok(());
        }
        // key_update, length 1, update_not_requested.
        self.seal(HANDSHAKE, 5, |b| {
            b.copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
            Ok(())
        })?;
        let key = next().map_err(|e| io::Error::other(format!("TLS key update: {e}")))?;
        self.key = DirectionKey::new(0, key)?;
        self.update_requested = false;
        Ok(())
    }

    /// Seals all of `pieces` (as one stream of bytes) into records and writes them to `tcp`.
    pub(crate) fn write_all(
        &mut self,
        tcp: &TcpStream,
        pieces: &[Plain<'_>],
        next: KeySource<'_>,
    ) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
        }
        let r = self.seal_and_send(tcp, pieces, next);
        if let Err(e) = &r {
            self.broken = Some(format!("TLS: an earlier write failed part way: {e}"));
        }
        r
    }

    fn seal_and_send(
        &mut self,
        tcp: &TcpStream,
        pieces: &[Plain<'_>],
        next: KeySource<'_>,
    ) -> io::Result<()> {
        let total: usize = pieces.iter().map(Plain::len).sum();
        let (mut piece, mut at) = (0, 0);
        let mut left = total;
        while left > 0 {
            self.maybe_rekey(next)?;
            let len = left.min(MAX_PLAINTEXT);
            // A record's plaintext may span pieces (a frame's header and its pages).
            self.seal(APPLICATION_DATA, len, |mut dst| {
                while !dst.is_empty() {
                    let p = pieces[piece];
                    let n = (p.len() - at).min(dst.len());
                    p.copy_out(at, &mut dst[..n])?;
                    dst = &mut dst[n..];
                    at += n;
                    if at == p.len() {
                        piece += 1;
                        at = 0;
                    }
                }
                Ok(())
            })?;
            left -= len;
            if self.out.len() >= WRITE_BATCH {
                self.flush(tcp)?;
            }
        }
        self.flush(tcp)
    }

    fn flush(&mut self, mut tcp: &TcpStream) -> io::Result<()> {
        let r = tcp.write_all(&self.out);
        self.out.clear();
        r
    }

    /// Sends `close_notify`: the peer reads the end of the stream.
    pub(crate) fn close(&mut self, tcp: &TcpStream) -> io::Result<()> {
        if self.broken.is_some() {
            return Ok(());
        }
        // Warning level, close_notify.
        self.seal(ALERT, 2, |b| {
            b.copy_from_slice(&[1, 0]);
            Ok(())
        })?;
        self.broken = Some("TLS: the stream was shut down for writing".into());
        self.flush(tcp)
    }
}

/// The receiving direction: reads records from the socket and opens them in place.
pub(crate) struct Opener {
    key: DirectionKey,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last record opened, not yet read: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// `close_notify` came, or the connection ended between records.
    closed: bool,
    /// What broke the stream; every later read fails with it.
    failed: Option<String>,
    /// The peer refused the connection (an alert other than `close_notify`): `failed` says
    /// how.
    refused: bool,
    /// Who the peer is, for messages.
    peer: &'static str,
}

/// What an opened record asks of the sending side.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Opened {
    /// The peer asked for a key update of ours.
    pub(crate) update_requested: bool,
}

impl Opener {
    /// `plain` and `records` hold what arrived with the end of the handshake: plaintext
    /// rustls decrypted, then records it did not look at.
    pub(crate) fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        plain: &[u8],
        records: &[u8],
        peer: &'static str,
    ) -> io::Result<Self> {
        let early = plain.len() + records.len();
        let mut buf = vec![0u8; READ_BUFFER.max(early) + HEADER + MAX_CIPHERTEXT];
        buf[..plain.len()].copy_from_slice(plain);
        buf[plain.len()..early].copy_from_slice(records);
        Ok(Opener {
            key: DirectionKey::new(seq, secrets)?,
            buf,
            start: plain.len(),
            end: early,
            plain: (0, plain.len()),
            closed: false,
            failed: None,
            refused: false,
            peer,
        })
    }

    /// Whether a read would return without waiting for the socket: plaintext, a whole record,
    /// the end of the stream or an error is here.
    pub(crate) fn ready(&self) -> bool {
        self.plain.0 < self.plain.1
            || self.closed
            || self.failed.is_some()
            || self.whole_record().is_some()
    }

    /// The length of the record at `start`, if all of it is here.
    fn whole_record(&self) -> Option<usize> {
        let len = self.header()?.1;
        (self.end - self.start >= HEADER + len).then_some(len)
    }

    /// The header of the record at `start`, once it is here: its first three bytes (type and
    /// legacy version) and the length it announces.
    fn header(&self) -> Option<([u8; 3], usize)> {
        let h = self.buf.get(self.start..self.start + HEADER)?;
        (self.end - self.start >= HEADER).then(|| {
            (
                [h[0], h[1], h[2]],
                u16::from_be_bytes([h[3], h[4]]) as usize,
            )
        })
    }

    fn fail(&mut self, why: String) -> io::Error {
        self.failed = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// Reads plaintext into `out`: what was opened already, else the next records, reading
    /// the socket as needed (its read timeout applies). `Ok(0)` is the end of the stream.
    pub(crate) fn read(
        &mut self,
        mut tcp: &TcpStream,
        out: &mut [u8],
        next: KeySource<'_>,
        opened: &mut Opened,
    ) -> io::Result<usize> {
        self.read_from(&mut |b| tcp.read(b), out, next, opened)
    }

    /// Why the peer refused the connection, if an alert saying so has arrived: a write that
    /// failed because the peer closed may have an explanation waiting. Reads only what is
    /// there already.
    pub(crate) fn refusal(&mut self, tcp: &TcpStream) -> Option<io::Error> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = tcp.as_raw_fd();
        let mut sink = [0u8; 4096];
        let mut no_keys = || Err(rustls::Error::General("no key update now".into()));
        loop {
            let r = self.read_from(
                &mut |b| recv(fd, b, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from),
                &mut sink,
                &mut no_keys,
                &mut Opened::default(),
            );
            if !matches!(r, Ok(n) if n > 0) {
                let why = self.failed.clone().filter(|_| self.refused)?;
                return Some(io::Error::new(io::ErrorKind::InvalidData, why));
            }
        }
    }

    fn read_from(
        &mut self,
        recv: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
        out: &mut [u8],
        next: KeySource<'_>,
        opened: &mut Opened,
    ) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.plain.0 < self.plain.1 {
                let n = out.len().min(self.plain.1 - self.plain.0);
                out[..n].copy_from_slice(&self.buf[self.plain.0..self.plain.0 + n]);
                self.plain.0 += n;
                return Ok(n);
            }
            if let Some(why) = &self.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
            }
            if self.closed {
                return Ok(0);
            }
            if let Some((head, len)) = self.header() {
                if head[0] != APPLICATION_DATA
                    || head[1] != 3
                    || !(TAG + 1..=MAX_CIPHERTEXT).contains(&len)
                {
                    return Err(self.fail(format!(
                        "TLS: {} sent no valid record (header {head:02x?}, length {len})",
                        self.peer
                    )));
                }
                if self.end - self.start >= HEADER + len {
                    self.open(len, next, opened)?;
                    continue;
                }
            }
            // More ciphertext is needed: make room after what is here, then read.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            // A timeout or an interruption keeps what was read; the caller may go on.
            let n = recv(&mut self.buf[self.end..])?;
            if n == 0 {
                if self.end > 0 {
                    return Err(self.fail(format!(
                        "TLS: the connection to {} closed in the middle of a record",
                        self.peer
                    )));
                }
                // The application protocol says when it is done; a connection that ends
                // between records reads as its end, like a TCP connection.
                self.closed = true;
                return Ok(0);
            }
            self.end += n;
        }
    }

    /// Opens the record of ciphertext length `len` at `start`.
    fn open(&mut self, len: usize, next: KeySource<'_>, opened: &mut Opened) -> io::Result<()> {
        let at = self.start + HEADER;
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.buf[self.start..at]);
        self.start = at + len;
        let nonce = self.key.next_nonce();
        let plain_len =
            match self
                .key
                .key
                .open_in_place(nonce, Aad::from(header), &mut self.buf[at..at + len])
            {
                Ok(p) => p.len(),
                Err(_) => {
                    return Err(self.fail(format!(
                        "TLS: a record from {} failed authentication",
                        self.peer
                    )))
                }
            };
        // The inner content type is the last non-zero byte; zeros after it are padding.
        let Some(kind_at) = self.buf[at..at + plain_len].iter().rposition(|&b| b != 0) else {
            return Err(self.fail(format!(
                "TLS: a record from {} has no content type",
                self.peer
            )));
        };
        let body = (at, at + kind_at);
        match self.buf[at + kind_at] {
            APPLICATION_DATA => self.plain = body,
            ALERT => {
                let a = &self.buf[body.0..body.1];
                match a {
                    [_, 0] => self.closed = true,
                    [_, d] => {
                        let d = AlertDescription::from(*d);
                        self.refused = true;
                        return Err(self.fail(format!(
                            "TLS: {} refused the connection (alert {d:?})",
                            self.peer
                        )));
                    }
                    _ => {
                        return Err(self.fail(format!("TLS: a malformed alert from {}", self.peer)))
                    }
                }
            }
            HANDSHAKE => self.post_handshake(body, next, opened)?,
            other => {
                return Err(self.fail(format!(
                    "TLS: a record of content type {other} from {}",
                    self.peer
                )))
            }
        }
        Ok(())
    }

    /// Handshake messages after the handshake: a key update is honoured, a session ticket
    /// ignored (umemd never resumes a session); anything else ends the stream.
    fn post_handshake(
        &mut self,
        (mut from, to): (usize, usize),
        next: KeySource<'_>,
        opened: &mut Opened,
    ) -> io::Result<()> {
        while from < to {
            if to - from < 4 {
                return Err(self.fail(format!(
                    "TLS: a truncated handshake message from {}",
                    self.peer
                )));
            }
            let m = &self.buf[from..to];
            let len = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            if m.len() < 4 + len {
                return Err(self.fail(format!(
                    "TLS: a handshake message from {} split across records",
                    self.peer
                )));
            }
            match (m[0], len) {
                (KEY_UPDATE, 1) => {
                    let request = m[4];
                    let key = match next() {
                        Ok(k) => k,
                        Err(e) => return Err(self.fail(format!("TLS key update: {e}"))),
                    };
                    self.key = DirectionKey::new(0, key)?;
                    if request == 1 {
                        opened.update_requested = true;
                    }
                }
                (NEW_SESSION_TICKET, _) => {}
                (t, _) => {
                    return Err(self.fail(format!(
                        "TLS: an unexpected handshake message (type {t}) from {}",
                        self.peer
                    )))
                }
            }
            from += 4 + len;
        }
        Ok(())
    }
}
