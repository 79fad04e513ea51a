//! `PeerMessage::decode` and `PageRun::decode_pages_header` on every frame of an arbitrary
//! stream: no panic, no allocation beyond what the body can hold, the header decode agrees with
//! the whole-body decode, and whatever decodes re-encodes to the very same bytes.

use arbitrary::Unstructured;
use fastrand::Rng;
use proto::frame::{self, FramePrefix, PREFIX_LEN};
use proto::local::LocalMessage;
use proto::peer::{kind, PageRun, PeerMessage, RUN_HEADER_LEN};
use proto::DecodeError;

use crate::engine::Target;
use crate::generate::{self, encode_peer};

/// The peer stream's decoders.
#[derive(Debug, Default)]
pub struct PeerDecode;

/// A decode error's variant and field, for outcome signatures.
pub fn error_class(e: &DecodeError) -> (u8, &'static str) {
    match e {
        DecodeError::Truncated { field } => (1, field),
        DecodeError::TrailingBytes(_) => (2, ""),
        DecodeError::UnknownKind(_) => (3, ""),
        DecodeError::Invalid { field, .. } => (4, field),
    }
}

impl Target for PeerDecode {
    fn name(&self) -> &'static str {
        "peer"
    }

    fn seeds(&mut self, rng: &mut Rng) -> Vec<Vec<u8>> {
        let raw: Vec<u8> = std::iter::repeat_with(|| rng.u8(..))
            .take(1 << 14)
            .collect();
        let mut u = Unstructured::new(&raw);
        let mut seeds = Vec::new();
        for v in 0..generate::PEER_VARIANTS {
            if let Ok(m) = generate::peer_message_of(&mut u, v) {
                let mut one = Vec::new();
                encode_peer(&mut one, &m, v as u8);
                seeds.push(one);
            }
        }
        seeds.push(seeds.concat());
        seeds
    }

    fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
        let mut stream = Vec::new();
        for _ in 0..u.int_in_range(1..=6)? {
            encode_peer(&mut stream, &generate::peer_message(u)?, u.arbitrary()?);
        }
        Ok(stream)
    }

    fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
        super::each_frame(input, outcomes, check)
    }

    fn max_len(&self) -> usize {
        // Room for a full page run.
        2 << 20
    }
}

fn check(prefix: FramePrefix, body: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
    let decoded = super::decode_measured("peer", prefix, body, outcomes, PeerMessage::decode)?;

    if prefix.kind == kind::PAGES {
        let header = body.first_chunk::<RUN_HEADER_LEN>();
        match (
            &decoded,
            header.map(|h| PageRun::decode_pages_header(prefix, h)),
        ) {
            (Ok(PeerMessage::Pages(a)), Some(Ok(b))) if *a == b => {}
            (Err(_), Some(Err(_)) | None) => {}
            (a, b) => {
                return Err(format!(
                    "pages header disagrees: the body decodes as {a:?}, its header as {b:?}"
                ))
            }
        }
    }

    let Ok(m) = decoded else { return Ok(()) };
    match LocalMessage::decode(prefix.kind, body) {
        Err(DecodeError::UnknownKind(_)) => {}
        other => {
            return Err(format!(
                "kind known to both protocols: {:#04x} decodes as {m:?} and {other:?}",
                prefix.kind
            ))
        }
    }
    let mut buf = Vec::new();
    m.encode(&mut buf);
    if let PeerMessage::Pages(run) = &m {
        // The data is not part of the value: only the header is compared.
        buf.resize(buf.len() + run.data_len(), 0);
    }
    let again = match frame::split(&buf) {
        Ok(Some((p, again, tail))) if tail.is_empty() && p.kind == prefix.kind => again,
        other => return Err(format!("re-encoding is no single frame: {m:?}: {other:?}")),
    };
    if PeerMessage::decode(prefix.kind, again).as_ref() != Ok(&m) {
        return Err(format!("re-encoding decodes otherwise: {m:?}"));
    }
    let same = if prefix.kind == kind::PAGES {
        again.len() == body.len() && again[..RUN_HEADER_LEN] == body[..RUN_HEADER_LEN]
    } else {
        again == body
    };
    if !same || buf.len() != PREFIX_LEN + body.len() {
        return Err(format!("non-canonical encoding accepted: {m:?}"));
    }
    Ok(())
}
