//! Little-endian field encoding and a bounds-checked reader.

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended before field `field` was complete.
    #[error("message truncated while reading {field}")]
    Truncated {
        /// Name of the field being read.
        field: &'static str,
    },
    /// Bytes were left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A one-byte kind that no message has.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// A field held a value outside its allowed range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Name of the field.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Appends little-endian fields to a buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// A writer that appends to `buf`.
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        Writer { buf }
    }

    fn out(&mut self) -> &mut Vec<u8> {
        self.buf
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.out().push(v);
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) {
        self.out().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.out().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.out().extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a bool as one byte.
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    /// Appends a `u32` length and the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.out().extend_from_slice(v);
    }
    /// Appends raw bytes with no length.
    pub fn raw(&mut self, v: &[u8]) {
        self.out().extend_from_slice(v);
    }
    /// Appends a `u16` length and the UTF-8 bytes.
    pub fn str(&mut self, v: &str) {
        let b = v.as_bytes();
        // Cut on a character boundary so the shortened text is still UTF-8.
        let mut n = b.len().min(u16::MAX as usize);
        while !v.is_char_boundary(n) {
            n -= 1;
        }
        self.u16(n as u16);
        self.out().extend_from_slice(&b[..n]);
    }
}

/// Reads little-endian fields from a byte slice, failing cleanly at its end.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    /// Reads one byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// Reads a bool that must be 0 or 1.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::invalid(field, format!("{v} is not a bool"))),
        }
    }
    /// Reads a `u32`-length-prefixed byte string.
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }
    /// Reads a `u16`-length-prefixed UTF-8 string.
    pub fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.u16(field)? as usize;
        let b = self.take(n, field)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::invalid(field, "not UTF-8"))
    }
    /// Reads a `u32` element count, refusing counts that cannot fit in what is left when each
    /// element needs at least `min_elem` bytes (so a forged count cannot make us allocate).
    pub fn count(&mut self, field: &'static str, min_elem: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(min_elem.max(1)) > self.data.len() {
            return Err(DecodeError::Truncated { field });
        }
        Ok(n)
    }
    /// Fails if any byte is left.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.data.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_fields() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.u8(7);
        w.u16(0x1234);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.bool(true);
        w.str("ram-low");
        w.bytes(&[1, 2, 3]);
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0x1234);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 1);
        assert!(r.bool("e").unwrap());
        assert_eq!(r.str("f").unwrap(), "ram-low");
        assert_eq!(r.bytes("g").unwrap(), &[1, 2, 3]);
        r.finish().unwrap();
    }

    #[test]
    fn truncation_names_the_field() {
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(
            r.u32("block"),
            Err(DecodeError::Truncated { field: "block" })
        );
    }

    #[test]
    fn forged_count_is_refused() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert!(r.count("blocks", 8).is_err());
    }

    #[test]
    fn bad_bool_and_utf8() {
        assert!(Reader::new(&[2]).bool("flag").is_err());
        assert!(Reader::new(&[1, 0, 0xff]).str("name").is_err());
    }
}
