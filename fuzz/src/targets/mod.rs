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
