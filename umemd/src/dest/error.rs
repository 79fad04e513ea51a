//! Why an incoming migration fails. The wording of each message is what the VMM shows the
//! operator (`query-migrate`), behind the phase the migration was in; the source gets the same
//! text.

use std::io;

use proto::frame::FrameError;
use proto::{BlockDesc, DecodeError};

use super::fault::FaultError;
use super::phase::{DestPhase, PhaseError};
use crate::error::SessionError;
use crate::link::LinkError;
use crate::mapping::MappingError;
use crate::stream::StreamError;

/// An incoming migration's failure, with the phase it failed in.
pub type DestFailure = SessionError<DestPhase, DestError>;

/// Why an incoming migration fails.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// The VM's memory cannot be mapped, or a page cannot be dropped from it.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The listening socket cannot be set up.
    #[error(transparent)]
    Listen(#[from] StreamError),
    /// Writing to the VMM, or cloning its connection, failed.
    #[error("VMM connection: {0}")]
    Vmm(#[source] io::Error),
    /// The VMM's connection ended with this reason.
    #[error("destination VMM connection: {0}")]
    VmmLink(#[source] LinkError),
    /// The VMM's reader is gone.
    #[error("destination VMM connection lost")]
    VmmLost,
    /// The VMM sent a message out of turn.
    #[error("unexpected message from the VMM: {0}")]
    VmmUnexpected(String),
    /// The VMM could not load the machine state.
    #[error("VMM could not load the machine state: {0}")]
    StateRefused(String),
    /// Something waited for did not come in time.
    #[error("{waiting_for} did not come within {secs} s")]
    Timeout {
        /// What was waited for.
        waiting_for: &'static str,
        /// How long.
        secs: u64,
    },
    /// `migrate-cancel` on the destination before the VM ran here.
    #[error("migration cancelled on the destination")]
    Cancelled,
    /// Reading from or writing to the source failed.
    #[error("source connection: {0}")]
    Peer(#[source] io::Error),
    /// The source's connection ended before the migration did.
    #[error("source closed the connection mid-migration")]
    PeerClosed,
    /// Nothing came from the source, not even a heartbeat, for the link timeout.
    #[error("no message from the source within the link timeout: the source or the link is dead")]
    Silent,
    /// The source failed and said why.
    #[error("source failed: {0}")]
    PeerFailed(String),
    /// The address may not be used without a secret.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// Accepting the source's connection failed.
    #[error("accepting the source: {0}")]
    Accept(#[source] io::Error),
    /// A frame from the source is malformed.
    #[error("{context}: {err}")]
    Frame {
        /// Where it came.
        context: &'static str,
        /// What is wrong.
        #[source]
        err: FrameError,
    },
    /// A message from the source does not decode.
    #[error("{context}: {err}")]
    Malformed {
        /// Where it came.
        context: &'static str,
        /// What is wrong.
        #[source]
        err: DecodeError,
    },
    /// The source speaks another protocol version.
    #[error("source speaks protocol version {theirs}, this umemd {ours}")]
    Version {
        /// The source's.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The source sent a message out of turn.
    #[error("expected {expected} from the source, got {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: String,
        /// What came, as debug text.
        got: String,
    },
    /// The source's RAM layout is not this VM's.
    #[error(transparent)]
    Layout(#[from] LayoutMismatch),
    /// The source sent pages outside the layout.
    #[error("source sent {0}")]
    BadPages(#[source] MappingError),
    /// The source discarded pages outside the layout.
    #[error("source discarded {0}")]
    BadDiscard(#[source] MappingError),
    /// The source broke the order of the protocol.
    #[error("{0}")]
    Protocol(&'static str),
    /// Writing pages into the memfd failed.
    #[error("writing pages into guest RAM: {0}")]
    Write(#[source] io::Error),
    /// The userfaultfd failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// A thread could not be started.
    #[error("starting the {thread} thread: {err}")]
    Spawn {
        /// Which.
        thread: &'static str,
        /// Why.
        #[source]
        err: io::Error,
    },
    /// The placing thread is gone (a bug: it ends only with the session).
    #[error("the thread placing pages into guest RAM stopped")]
    PlacerLost,
    /// Postcopy machinery without a userfaultfd.
    #[error("no userfaultfd")]
    NoUffd,
    /// A bug: the session tried an illegal phase transition.
    #[error(transparent)]
    Phase(#[from] PhaseError),
}

impl DestError {
    /// True when the link to the source failed (closed, silent, a read or write error): while
    /// the VM runs here, a new connection from the source can resume the migration.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            DestError::Peer(_)
                | DestError::PeerClosed
                | DestError::Silent
                | DestError::Frame {
                    err: proto::FrameError::Io(_),
                    ..
                }
        )
    }

    /// A read from the source failed: an early end is the source's closing.
    pub fn read(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => DestError::PeerClosed,
            _ if crate::link::is_timeout(&e) => DestError::Silent,
            _ => DestError::Peer(e),
        }
    }
}

/// The source's blocks are not the destination's.
#[derive(Debug, thiserror::Error)]
#[error(
    "RAM layout mismatch: source has [{}], destination has [{}]",
    list(source_blocks),
    list(dest_blocks)
)]
pub struct LayoutMismatch {
    /// The source's blocks.
    pub source_blocks: Vec<BlockDesc>,
    /// This VM's blocks.
    pub dest_blocks: Vec<BlockDesc>,
}

fn list(v: &[BlockDesc]) -> String {
    v.iter()
        .map(|b| format!("{} ({} MiB at {:#x})", b.name, b.size >> 20, b.guest_addr))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_words() {
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert!(matches!(DestError::read(eof), DestError::PeerClosed));
        let f = DestFailure {
            phase: DestPhase::Precopy,
            cause: DestError::PeerClosed,
        };
        assert_eq!(
            f.to_string(),
            "precopy: source closed the connection mid-migration"
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(DestError::read(reset)
            .to_string()
            .starts_with("source connection: "));
    }
}
