//! Wire formats of umem.
//!
//! Two kinds of connection carry these messages:
//! - [`peer`]: the TCP migration stream between the source and the destination `umemd`;
//! - [`local`]: the Unix socket between a `vmm` and its host's `umemd` (file descriptors travel
//!   beside these frames with `SCM_RIGHTS`).
//!
//! [`auth`] is the challenge-response that opens every peer connection.
//!
//! Both use the same [`frame`] layout: a little-endian `u32` body length, then a one-byte kind,
//! then the kind's fields. Decoding never panics and never trusts a length it has not checked
//! against [`frame::MAX_FRAME`] or the bytes actually present.
#![warn(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs)]

pub mod auth;
pub mod frame;
pub mod local;
pub mod peer;
pub mod peercred;
pub mod types;
pub mod wire;

pub use frame::{FrameError, FramePrefix, MAX_FRAME, PREFIX_LEN};
pub use types::{
    BlockDesc, MigrationMode, MigrationParams, MigrationStats, Phase, PostcopyStats, TimeoutAction,
    HUGE_PAGE_SIZE, PAGE_SIZE,
};
pub use wire::DecodeError;
