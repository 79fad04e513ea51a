//! `frame::split` and `frame::read` over arbitrary byte streams: `split` tiles the stream into
//! the frames its prefixes announce without allocating, `read` sees the same frames and ends
//! the same way, and allocates at most the body a prefix announces.

use arbitrary::Unstructured;
use fastrand::Rng;
use proto::frame::{self, FrameError, MAX_FRAME, PREFIX_LEN};

use crate::alloc::measure;
use crate::engine::{signature, Target};
use crate::generate::{self, encode_peer};

/// Bytes `read` may allocate beyond the body it was told of.
const READ_SLACK: usize = 64;

/// `frame::split` and `frame::read`.
#[derive(Debug, Default)]
pub struct Frames;

/// How the stream ended after its whole frames.
enum End {
    Clean,
    Partial { announced: Option<u32> },
    TooLarge(u32),
}

impl Target for Frames {
    fn name(&self) -> &'static str {
        "frame"
    }

    fn seeds(&mut self, rng: &mut Rng) -> Vec<Vec<u8>> {
        let raw: Vec<u8> = std::iter::repeat_with(|| rng.u8(..))
            .take(1 << 14)
            .collect();
        let mut u = Unstructured::new(&raw);
        let mut stream = Vec::new();
        for v in 0..generate::PEER_VARIANTS {
            if let Ok(m) = generate::peer_message_of(&mut u, v) {
                encode_peer(&mut stream, &m, v as u8);
            }
        }
        for v in 0..generate::LOCAL_VARIANTS {
            if let Ok(m) = generate::local_message_of(&mut u, v) {
                m.encode(&mut stream);
            }
        }
        let mut partial = stream.clone();
        partial.truncate(stream.len() - 3);
        vec![stream, partial, vec![0xff, 0xff, 0xff, 0xff, 1], Vec::new()]
    }

    fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
        let mut stream = Vec::new();
        for _ in 0..u.int_in_range(0..=6)? {
            if u.arbitrary()? {
                encode_peer(&mut stream, &generate::peer_message(u)?, u.arbitrary()?);
            } else {
                generate::local_message(u)?.encode(&mut stream);
            }
        }
        if u.ratio(1, 4)? {
            // A last frame that announces more than follows, or junk.
            let announced = generate::edgy_u32(u)?;
            stream.extend_from_slice(&announced.to_le_bytes());
            let tail: Vec<u8> = u.arbitrary()?;
            stream.extend_from_slice(&tail);
        }
        Ok(stream)
    }

    fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
        let mut rest = input;
        let mut frames = Vec::new();
        let end = loop {
            let (split, allocated) = measure(|| frame::split(rest));
            if allocated != 0 {
                return Err(format!("split allocated: {allocated} bytes"));
            }
            match split {
                Ok(Some((p, body, tail))) => {
                    let end = PREFIX_LEN + p.len as usize;
                    if body != &rest[PREFIX_LEN..end] || tail != &rest[end..] {
                        return Err(format!(
                            "split is not the announced frame: {} bytes announced, body of {}, {} left of {}",
                            p.len,
                            body.len(),
                            tail.len(),
                            rest.len()
                        ));
                    }
                    outcomes.push(signature(("whole", p.kind)));
                    frames.push((p, body));
                    rest = tail;
                }
                Ok(None) => {
                    let announced = rest.first_chunk::<4>().map(|b| u32::from_le_bytes(*b));
                    if let (Some(n), true) = (announced, rest.len() >= PREFIX_LEN) {
                        if n > MAX_FRAME || rest.len() >= PREFIX_LEN + n as usize {
                            return Err(format!(
                                "split wants more: {} bytes there for {n} announced",
                                rest.len()
                            ));
                        }
                    }
                    outcomes.push(signature(("partial", rest.len().min(PREFIX_LEN + 1))));
                    break if rest.is_empty() {
                        End::Clean
                    } else {
                        End::Partial { announced }
                    };
                }
                Err(FrameError::TooLarge(n)) => {
                    let announced = rest.first_chunk::<4>().map(|b| u32::from_le_bytes(*b));
                    if n <= MAX_FRAME || announced != Some(n) {
                        return Err(format!(
                            "split refused a size: {n} bytes, {announced:?} announced"
                        ));
                    }
                    outcomes.push(signature("too large"));
                    break End::TooLarge(n);
                }
                Err(e) => return Err(format!("split failed: {e}")),
            }
        };

        let mut reader = input;
        let mut body = Vec::new();
        for (p, b) in frames {
            let (got, allocated) = measure(|| frame::read(&mut reader, &mut body));
            match got {
                Ok(q) if q == p && body == b => {}
                other => {
                    return Err(format!(
                        "read disagrees with split: {other:?} for {p:?} of {} bytes",
                        b.len()
                    ))
                }
            }
            if allocated > p.len as usize + READ_SLACK {
                return Err(format!(
                    "read allocated: {allocated} bytes for a {}-byte body",
                    p.len
                ));
            }
        }
        if reader.len() != rest.len() {
            return Err(format!(
                "read consumed: {} bytes left where split left {}",
                reader.len(),
                rest.len()
            ));
        }
        let (last, allocated) = measure(|| frame::read(&mut reader, &mut Vec::new()));
        let ok = match (&end, &last) {
            (End::Clean, Err(e)) => e.is_eof() && allocated == 0,
            (End::Partial { announced }, Err(e)) => {
                e.is_eof() && allocated <= announced.unwrap_or(0) as usize + READ_SLACK
            }
            (End::TooLarge(n), Err(FrameError::TooLarge(m))) => n == m && allocated == 0,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "read ends otherwise than split: {last:?}, {allocated} bytes allocated"
            ));
        }
        Ok(())
    }
}
