//! What the fuzzer runs: the wire decoders of `proto` and the destination's page placement.

pub mod dest;
pub mod frame;
pub mod local;
pub mod peer;

use crate::engine::Target;

/// Every target's name, in the order they take turns.
pub const NAMES: [&str; 4] = ["frame", "peer", "local", "dest"];

/// The target named `name`.
pub fn by_name(name: &str) -> std::io::Result<Box<dyn Target>> {
    Ok(match name {
        "frame" => Box::new(frame::Frames),
        "peer" => Box::new(peer::PeerDecode),
        "local" => Box::new(local::LocalDecode),
        "dest" => Box::new(dest::DestPlacement::new()?),
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no target {other:?} (targets: {})", NAMES.join(", ")),
            ))
        }
    })
}

/// Checks one frame, recording its outcome.
pub(crate) type FrameCheck = fn(proto::FramePrefix, &[u8], &mut Vec<u64>) -> Result<(), String>;

/// Runs `check` on each whole frame of `input` in turn, up to the first that is not whole.
pub(crate) fn each_frame(
    input: &[u8],
    outcomes: &mut Vec<u64>,
    check: FrameCheck,
) -> Result<(), String> {
    let mut rest = input;
    while let Ok(Some((prefix, body, tail))) = proto::frame::split(rest) {
        check(prefix, body, outcomes)?;
        rest = tail;
    }
    Ok(())
}

/// Decodes `body` with `decode`, failing when the decoder allocates more than its bound, and
/// records the outcome under `what` ("peer", "local").
pub(crate) fn decode_measured<M>(
    what: &str,
    prefix: proto::FramePrefix,
    body: &[u8],
    outcomes: &mut Vec<u64>,
    decode: impl FnOnce(u8, &[u8]) -> Result<M, proto::DecodeError>,
) -> Result<Result<M, proto::DecodeError>, String> {
    let (decoded, allocated) = crate::alloc::measure(|| decode(prefix.kind, body));
    if allocated > crate::alloc::decode_bound(body.len()) {
        return Err(format!(
            "{what} decode allocated: {allocated} bytes for kind {:#04x} of {} bytes",
            prefix.kind,
            body.len()
        ));
    }
    outcomes.push(crate::engine::signature((
        what,
        prefix.kind,
        decoded.as_ref().err().map(peer::error_class),
    )));
    Ok(decoded)
}
