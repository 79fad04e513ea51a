//! Why an outgoing migration fails. The wording of each message is what the VMM shows the
//! operator (`query-migrate`), behind the phase the migration was in.

use std::io;

use proto::peer::PeerMessage;

use super::phase::{PhaseError, SourcePhase};
use crate::auth::AuthError;
use crate::bitmap::BitmapError;
use crate::error::SessionError;
use crate::link::LinkError;
use crate::mapping::MappingError;
use crate::stream::StreamError;

/// An outgoing migration's failure, with the phase it failed in.
pub type SourceFailure = SessionError<SourcePhase, SourceError>;

/// Why an outgoing migration fails.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The VM's memory cannot be mapped.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Writing to the VMM, or cloning its connection, failed.
    #[error("VMM connection: {0}")]
    Vmm(#[source] io::Error),
    /// The VMM's connection ended with this reason.
    #[error("VMM connection: {0}")]
    VmmLink(#[source] LinkError),
    /// The VMM's reader is gone.
    #[error("VMM connection lost")]
    VmmLost,
    /// The VMM sent a message out of turn.
    #[error("unexpected message from the VMM: {0}")]
    VmmUnexpected(String),
    /// The VMM's harvest said its vCPUs run when they should be stopped, or the reverse.
    #[error(
        "VMM reported vCPUs {}stopped, expected {}stopped",
        if *stopped { "" } else { "not " },
        if *stopped { "not " } else { "" }
    )]
    VmmStopped {
        /// What the VMM reported.
        stopped: bool,
    },
    /// The VMM stopped its vCPUs without handing over the machine state.
    #[error("the VMM sent no machine state at switchover")]
    NoMachineState,
    /// A dirty bitmap from the VMM does not fit the layout.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// A dirty page lies outside the layout.
    #[error("dirty bitmap: {0}")]
    DirtyPage(#[source] MappingError),
    /// `migrate-cancel`.
    #[error("migration cancelled")]
    Cancelled,
    /// A precopy that may not move to postcopy ran past its completion timeout.
    #[error("cancelled: the migration ran past its completion timeout of {limit_ms} ms ({per_gib_s} s per GiB of guest RAM); the VM runs on here")]
    CompletionTimeout {
        /// The limit, for this VM's RAM.
        limit_ms: u64,
        /// `completion_timeout_per_gib_s`.
        per_gib_s: u32,
    },
    /// Mode postcopy or hybrid towards a destination without a userfaultfd.
    #[error("the destination cannot run postcopy (its VMM passed no userfaultfd)")]
    NoPostcopy,
    /// The destination cannot be reached.
    #[error(transparent)]
    Connect(#[from] StreamError),
    /// A connection to the destination did not authenticate, or the address may not be used
    /// without a secret.
    #[error("authenticating the destination: {0}")]
    Auth(#[from] AuthError),
    /// Writing to the destination failed.
    #[error("destination connection: {0}")]
    Peer(#[source] io::Error),
    /// The destination's connection ended with this reason.
    #[error("destination connection: {0}")]
    PeerLink(#[source] LinkError),
    /// The destination's reader is gone.
    #[error("destination connection lost")]
    PeerClosed,
    /// Writing to the urgent channel failed.
    #[error("destination urgent channel: {0}")]
    Urgent(#[source] io::Error),
    /// The destination refused the handshake or the layout.
    #[error("destination refused: {0}")]
    PeerRefused(String),
    /// The destination failed and said why.
    #[error("destination failed: {0}")]
    PeerFailed(String),
    /// The destination speaks another protocol version.
    #[error("destination speaks protocol version {theirs}, this umemd {ours}")]
    Version {
        /// The destination's.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The destination sent a message out of turn.
    #[error("expected {expected} from the destination, got {got}")]
    Protocol {
        /// What the protocol allows here.
        expected: &'static str,
        /// What came, as debug text.
        got: String,
    },
    /// The destination did not answer in time.
    #[error("the destination did not answer within {secs} s (waiting for {waiting_for})")]
    Timeout {
        /// The message waited for.
        waiting_for: &'static str,
        /// How long.
        secs: u64,
    },
    /// Every page went, but the destination never said it holds them all.
    #[error("the destination never confirmed every page")]
    NeverConfirmed,
    /// The destination requested pages outside the layout.
    #[error("destination requested {0}")]
    BadRequest(#[source] MappingError),
    /// `migrate-pause`: the link was cut on purpose.
    #[error("paused by request (migrate-pause)")]
    PausedByRequest,
    /// A destination came back but cannot resume this migration (it never ran the VM, or
    /// lost it): nothing will bring the migration back.
    #[error("the destination cannot resume this migration: {0}")]
    NotResumable(String),
    /// A failure after the commit: the VM may already run on the destination.
    #[error("{0}; the switchover was committed, so the VM may run on the destination")]
    AfterCommit(#[source] Box<SourceError>),
    /// A bug: the session tried an illegal phase transition.
    #[error(transparent)]
    Phase(#[from] PhaseError),
}

impl SourceError {
    /// True when the link to the destination failed (closed, silent, refused writes): after the
    /// switchover a new connection can resume the migration.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            SourceError::Peer(_)
                | SourceError::PeerLink(
                    LinkError::Closed | LinkError::Silent(_) | LinkError::Frame(_)
                )
                | SourceError::PeerClosed
                | SourceError::Urgent(_)
                | SourceError::Timeout { .. }
                | SourceError::PausedByRequest
        )
    }

    /// The error for `got` arriving where `expected` should: the destination's own reason if
    /// it sent one.
    pub fn unexpected(expected: &'static str, got: PeerMessage) -> Self {
        match got {
            PeerMessage::Error(m) => SourceError::PeerFailed(m),
            other => SourceError::Protocol {
                expected,
                got: format!("{other:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_words() {
        let e = SourceError::AfterCommit(Box::new(SourceError::PeerClosed));
        assert_eq!(
            e.to_string(),
            "destination connection lost; the switchover was committed, so the VM may run on the destination"
        );
        let f = SourceFailure {
            phase: SourcePhase::Committed,
            cause: SourceError::Cancelled,
        };
        assert_eq!(f.to_string(), "committed: migration cancelled");
        assert_eq!(
            SourceError::VmmStopped { stopped: false }.to_string(),
            "VMM reported vCPUs not stopped, expected stopped"
        );
        assert!(matches!(
            SourceError::unexpected("Ready", PeerMessage::Error("no".into())),
            SourceError::PeerFailed(m) if m == "no"
        ));
        assert!(matches!(
            SourceError::unexpected("Ready", PeerMessage::AllSent),
            SourceError::Protocol {
                expected: "Ready",
                ..
            }
        ));
    }
}
