//! Frame layout shared by every connection: `u32` LE body length, `u8` kind, body.

use std::io::{self, Read};

use crate::wire::{DecodeError, Writer};

/// Bytes before a frame's body: the body length and the kind.
pub const PREFIX_LEN: usize = 5;

/// Largest body accepted. Page runs are at most [`crate::peer::MAX_RUN_PAGES`] pages (1 MiB)
/// and dirty bitmaps go in pieces of [`crate::local::MAX_BITMAP_WORDS`] words; the machine
/// state is one frame, so a VM's state must fit in this (a few KiB per vCPU).
pub const MAX_FRAME: u32 = 8 << 20;

/// The fixed start of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePrefix {
    /// Body length in bytes (after the prefix).
    pub len: u32,
    /// Message kind.
    pub kind: u8,
}

impl FramePrefix {
    /// Parses and bounds-checks a prefix.
    pub fn parse(b: &[u8; PREFIX_LEN]) -> Result<Self, FrameError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        Ok(FramePrefix { len, kind: b[4] })
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The peer announced a body larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(u32),
    /// The body did not decode.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
}

impl FrameError {
    /// True when the peer closed the connection cleanly between frames.
    pub fn is_eof(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof)
    }
}

/// Appends a whole frame of `kind` whose body `body` writes.
pub fn encode(buf: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Writer)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0, 0, 0, kind]);
    body(&mut Writer::new(buf));
    let len = (buf.len() - start - PREFIX_LEN) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Reads one frame's prefix and body (body into `body`, replacing its contents).
pub fn read<R: Read>(r: &mut R, body: &mut Vec<u8>) -> Result<FramePrefix, FrameError> {
    let mut p = [0u8; PREFIX_LEN];
    r.read_exact(&mut p)?;
    let prefix = FramePrefix::parse(&p)?;
    body.clear();
    body.resize(prefix.len as usize, 0);
    r.read_exact(body)?;
    Ok(prefix)
}

/// A whole frame found at the start of a buffer: its prefix, its body, and the bytes after it.
pub type Split<'a> = (FramePrefix, &'a [u8], &'a [u8]);

/// Splits the first whole frame off `data`. `Ok(None)` means more bytes are needed.
pub fn split(data: &[u8]) -> Result<Option<Split<'_>>, FrameError> {
    let Some(p) = data.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let prefix = FramePrefix::parse(p)?;
    let end = PREFIX_LEN + prefix.len as usize;
    if data.len() < end {
        return Ok(None);
    }
    Ok(Some((prefix, &data[PREFIX_LEN..end], &data[end..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_split() {
        let mut buf = Vec::new();
        encode(&mut buf, 9, |w| w.u32(42));
        encode(&mut buf, 10, |_| {});
        let (p, body, rest) = split(&buf).unwrap().unwrap();
        assert_eq!(p, FramePrefix { len: 4, kind: 9 });
        assert_eq!(body, 42u32.to_le_bytes());
        let (p2, body2, rest2) = split(rest).unwrap().unwrap();
        assert_eq!((p2.kind, body2.len(), rest2.len()), (10, 0, 0));
        assert!(split(&buf[..7]).unwrap().is_none());
    }

    #[test]
    fn oversized_prefix_is_refused_before_reading() {
        let p = [0xff, 0xff, 0xff, 0x7f, 1];
        assert!(matches!(
            FramePrefix::parse(&p),
            Err(FrameError::TooLarge(_))
        ));
        let mut r: &[u8] = &p;
        let mut body = Vec::new();
        assert!(matches!(
            read(&mut r, &mut body),
            Err(FrameError::TooLarge(_))
        ));
        assert!(body.capacity() < 1024);
    }

    #[test]
    fn eof_is_recognised() {
        let mut r: &[u8] = &[1, 0];
        let e = read(&mut r, &mut Vec::new()).unwrap_err();
        assert!(e.is_eof());
    }
}
