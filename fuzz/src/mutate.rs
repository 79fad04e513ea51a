//! Byte-level mutation of frame streams: bit flips, edge values, edits of frame length and kind
//! fields, truncation, chunk deletion, insertion and duplication, and splices of two inputs.

use fastrand::Rng;
use proto::frame::{self, MAX_FRAME, PREFIX_LEN};

/// Values that sit on the edges decoders check, for byte, word and length edits.
const EDGES: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0x7fff,
    0xffff,
    MAX_FRAME as u64,
    MAX_FRAME as u64 + 1,
    0x7fff_ffff,
    u32::MAX as u64,
    1 << 32,
    u64::MAX,
];

/// Where frames start in `data`, as far as `frame::split` can follow them; the offset of a last,
/// partial or oversized frame is included.
pub fn frame_starts(data: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + PREFIX_LEN <= data.len() {
        starts.push(at);
        match frame::split(&data[at..]) {
            Ok(Some((_, _, rest))) => at = data.len() - rest.len(),
            _ => break,
        }
    }
    starts
}

/// A mutated copy of `input`, with 1 to 8 stacked edits; `other` is a second input to splice
/// from. The result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    // Mostly one or two edits: a single change keeps the rest of the stream valid.
    let edits = 1 + (rng.u32(..).trailing_zeros() as usize).min(7);
    for _ in 0..edits {
        edit(rng, &mut v, other);
    }
    v.truncate(max_len);
    v
}

fn edit(rng: &mut Rng, v: &mut Vec<u8>, other: &[u8]) {
    match rng.u8(..13) {
        0 if !v.is_empty() => {
            let i = rng.usize(..v.len());
            v[i] ^= 1 << rng.u8(..8);
        }
        1 if !v.is_empty() => {
            let i = rng.usize(..v.len());
            v[i] = EDGES[rng.usize(..EDGES.len())] as u8;
        }
        2 if !v.is_empty() => {
            // An edge value over a field of 2, 4 or 8 bytes (counts, lengths, page numbers).
            let width = [2, 4, 8][rng.usize(..3)].min(v.len());
            let i = rng.usize(..=v.len() - width);
            let value = EDGES[rng.usize(..EDGES.len())].to_le_bytes();
            v[i..i + width].copy_from_slice(&value[..width]);
        }
        3 if v.len() >= 4 => {
            // Small arithmetic on a 32-bit field: a count or a length one off.
            let i = rng.usize(..=v.len() - 4);
            let mut w = [0u8; 4];
            w.copy_from_slice(&v[i..i + 4]);
            let x = u32::from_le_bytes(w).wrapping_add(rng.i32(-16..=16) as u32);
            v[i..i + 4].copy_from_slice(&x.to_le_bytes());
        }
        4 => edit_frame_length(rng, v),
        5 => {
            // Another kind for a frame: the body of one message read as another's.
            let starts = frame_starts(v);
            if let Some(&at) = pick(rng, &starts) {
                v[at + 4] = if rng.bool() {
                    rng.u8(0x01..=0x17)
                } else {
                    rng.u8(0x41..=0x6c)
                };
            }
        }
        6 if !v.is_empty() => v.truncate(rng.usize(..v.len())),
        7 if !v.is_empty() => {
            let from = rng.usize(..v.len());
            let to = (from + 1 + rng.usize(..64)).min(v.len());
            v.drain(from..to);
        }
        8 => {
            let at = rng.usize(..=v.len());
            let n = 1 + rng.usize(..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            v.splice(at..at, bytes);
        }
        9 if !v.is_empty() => {
            let from = rng.usize(..v.len());
            let to = (from + 1 + rng.usize(..256)).min(v.len());
            let chunk = v[from..to].to_vec();
            let at = rng.usize(..=v.len());
            v.splice(at..at, chunk);
        }
        10 => {
            // This input's head, the other's tail.
            let at = rng.usize(..=v.len());
            let from = rng.usize(..=other.len());
            v.truncate(at);
            v.extend_from_slice(&other[from..]);
        }
        11 => {
            // A whole frame of the other input inserted between two frames of this one.
            let theirs = frame_starts(other);
            let ours = frame_starts(v);
            if let Some(&from) = pick(rng, &theirs) {
                let end = match frame::split(&other[from..]) {
                    Ok(Some((_, _, rest))) => other.len() - rest.len(),
                    _ => other.len(),
                };
                let at = pick(rng, &ours).copied().unwrap_or(v.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
        }
        _ => {
            // A frame dropped or repeated.
            let starts = frame_starts(v);
            if let Some(&at) = pick(rng, &starts) {
                let end = match frame::split(&v[at..]) {
                    Ok(Some((_, _, rest))) => v.len() - rest.len(),
                    _ => v.len(),
                };
                if rng.bool() {
                    v.drain(at..end);
                } else {
                    let copy = v[at..end].to_vec();
                    v.splice(end..end, copy);
                }
            }
        }
    }
}

/// Sets a frame's body length to an edge or to a length near its own.
fn edit_frame_length(rng: &mut Rng, v: &mut [u8]) {
    let starts = frame_starts(v);
    let Some(&at) = pick(rng, &starts) else {
        return;
    };
    let mut w = [0u8; 4];
    w.copy_from_slice(&v[at..at + 4]);
    let len = u32::from_le_bytes(w);
    let new = if rng.bool() {
        EDGES[rng.usize(..EDGES.len())] as u32
    } else {
        len.wrapping_add(rng.i32(-20..=20) as u32)
    };
    v[at..at + 4].copy_from_slice(&new.to_le_bytes());
}

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> Option<&'a T> {
    if v.is_empty() {
        None
    } else {
        v.get(rng.usize(..v.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_starts_follow_the_stream() {
        let mut buf = Vec::new();
        frame::encode(&mut buf, 1, |w| w.u32(7));
        frame::encode(&mut buf, 2, |_| {});
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 3]);
        assert_eq!(frame_starts(&buf), vec![0, 9, 14]);
        assert_eq!(frame_starts(&buf[..3]), Vec::<usize>::new());
    }

    #[test]
    fn mutation_stays_within_its_bound() {
        let mut rng = Rng::with_seed(7);
        let mut buf = Vec::new();
        frame::encode(&mut buf, 1, |w| w.u64(1));
        for _ in 0..10_000 {
            let m = mutate(&mut rng, &buf, &buf, 64);
            assert!(m.len() <= 64);
        }
        assert!(mutate(&mut rng, &[], &[], 64).len() <= 64);
    }
}
