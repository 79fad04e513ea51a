//! `LocalMessage::decode` on every frame of an arbitrary stream: no panic, no allocation beyond
//! what the body can hold, and whatever decodes re-encodes to the very same bytes.

use arbitrary::Unstructured;
use fastrand::Rng;
use proto::frame::{self, FramePrefix};
use proto::local::LocalMessage;
use proto::peer::PeerMessage;
use proto::DecodeError;

use crate::engine::Target;
use crate::generate;

/// The local connection's decoder.
#[derive(Debug, Default)]
pub struct LocalDecode;

impl Target for LocalDecode {
    fn name(&self) -> &'static str {
        "local"
    }

    fn seeds(&mut self, rng: &mut Rng) -> Vec<Vec<u8>> {
        let raw: Vec<u8> = std::iter::repeat_with(|| rng.u8(..))
            .take(1 << 14)
            .collect();
        let mut u = Unstructured::new(&raw);
        let mut seeds = Vec::new();
        for v in 0..generate::LOCAL_VARIANTS {
            if let Ok(m) = generate::local_message_of(&mut u, v) {
                let mut one = Vec::new();
                m.encode(&mut one);
                seeds.push(one);
            }
        }
        seeds.push(seeds.concat());
        seeds
    }

    fn generate(&mut self, u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
        let mut stream = Vec::new();
        for _ in 0..u.int_in_range(1..=6)? {
            generate::local_message(u)?.encode(&mut stream);
        }
        Ok(stream)
    }

    fn run(&mut self, input: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
        super::each_frame(input, outcomes, check)
    }

    fn max_len(&self) -> usize {
        // Room for a few strings of the longest length.
        512 << 10
    }
}

fn check(prefix: FramePrefix, body: &[u8], outcomes: &mut Vec<u64>) -> Result<(), String> {
    let decoded = super::decode_measured("local", prefix, body, outcomes, LocalMessage::decode)?;
    let Ok(m) = decoded else { return Ok(()) };
    match PeerMessage::decode(prefix.kind, body) {
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
    let again = match frame::split(&buf) {
        Ok(Some((p, again, tail))) if tail.is_empty() && p.kind == prefix.kind => again,
        other => return Err(format!("re-encoding is no single frame: {m:?}: {other:?}")),
    };
    if LocalMessage::decode(prefix.kind, again).as_ref() != Ok(&m) {
        return Err(format!("re-encoding decodes otherwise: {m:?}"));
    }
    if again != body {
        return Err(format!("non-canonical encoding accepted: {m:?}"));
    }
    Ok(())
}
