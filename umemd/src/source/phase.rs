//! The phases of an outgoing migration and the transitions between them.
//!
//! ```text
//! Setup ──▶ Precopy ──▶ Switchover ──▶ Committed ──▶ Completed
//!   │                      ▲               │             ▲
//!   └──────────────────────┘               └─▶ Postcopy ─┘
//!                                               ▲     │
//!                                PostcopyPaused ┘ ◀───┘  (the link lost, then back)
//! (postcopy mode skips precopy)        any phase but the last two ──▶ Failed
//! ```

use std::fmt;

use proto::Phase;

pub use crate::phase::Transitions;

/// Where an outgoing migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Connecting, handshake, layout, first harvest.
    Setup,
    /// Precopy rounds while the guest runs.
    Precopy,
    /// The guest is stopped; the last pages or the discard list and the machine state go.
    Switchover,
    /// The destination has loaded the state and the source has committed: it never resumes the
    /// VM by itself from here, and a cancel is refused.
    Committed,
    /// The VM runs on the destination; requested pages are served, the rest pushed.
    Postcopy,
    /// Postcopy lost its link: every page is kept, and the source reconnects.
    PostcopyPaused,
    /// The destination runs the VM with every page.
    Completed,
    /// The migration failed.
    Failed,
}

/// An illegal transition between two phases of this role.
pub type PhaseError = crate::phase::PhaseError<SourcePhase>;

impl Transitions for SourcePhase {
    fn allows(self, next: Self) -> bool {
        use SourcePhase::*;
        matches!(
            (self, next),
            (Setup, Precopy)
                | (Setup, Switchover)
                | (Precopy, Switchover)
                | (Switchover, Committed)
                | (Committed, Postcopy)
                | (Committed, Completed)
                | (Postcopy, Completed)
                | (Postcopy, PostcopyPaused)
                | (PostcopyPaused, Postcopy)
                // A umemd started again takes over a postcopy whose VM runs on the destination.
                | (Setup, PostcopyPaused)
                | (
                    Setup | Precopy | Switchover | Committed | Postcopy | PostcopyPaused,
                    Failed
                )
        )
    }
}

impl SourcePhase {
    /// True once the switchover is committed: the VM may run on the destination.
    pub fn is_committed(self) -> bool {
        matches!(
            self,
            SourcePhase::Committed
                | SourcePhase::Postcopy
                | SourcePhase::PostcopyPaused
                | SourcePhase::Completed
        )
    }

    /// The phase as `query-migrate` reports it.
    pub fn reported(self) -> Phase {
        match self {
            SourcePhase::Setup => Phase::Setup,
            SourcePhase::Precopy => Phase::Precopy,
            SourcePhase::Switchover | SourcePhase::Committed => Phase::Switchover,
            SourcePhase::Postcopy => Phase::Postcopy,
            SourcePhase::PostcopyPaused => Phase::PostcopyPaused,
            SourcePhase::Completed => Phase::Completed,
            SourcePhase::Failed => Phase::Failed,
        }
    }

    /// Every phase, in order.
    pub const ALL: [SourcePhase; 8] = [
        SourcePhase::Setup,
        SourcePhase::Precopy,
        SourcePhase::Switchover,
        SourcePhase::Committed,
        SourcePhase::Postcopy,
        SourcePhase::PostcopyPaused,
        SourcePhase::Completed,
        SourcePhase::Failed,
    ];
}

impl fmt::Display for SourcePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourcePhase::Setup => "setup",
            SourcePhase::Precopy => "precopy",
            SourcePhase::Switchover => "switchover",
            SourcePhase::Committed => "committed",
            SourcePhase::Postcopy => "postcopy",
            SourcePhase::PostcopyPaused => "postcopy-paused",
            SourcePhase::Completed => "completed",
            SourcePhase::Failed => "failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::SourcePhase::*;
    use super::*;

    #[test]
    fn transition_table() {
        let legal = [
            (Setup, Precopy),
            (Setup, Switchover),
            (Precopy, Switchover),
            (Switchover, Committed),
            (Committed, Postcopy),
            (Committed, Completed),
            (Postcopy, Completed),
            (Postcopy, PostcopyPaused),
            (PostcopyPaused, Postcopy),
            (PostcopyPaused, Failed),
            (Setup, PostcopyPaused),
            (Setup, Failed),
            (Precopy, Failed),
            (Switchover, Failed),
            (Committed, Failed),
            (Postcopy, Failed),
        ];
        crate::phase::assert_transitions(&SourcePhase::ALL, &legal);
    }

    #[test]
    fn no_way_back_once_committed() {
        for p in [Committed, Postcopy, PostcopyPaused, Completed] {
            assert!(p.is_committed());
            assert!(!p.allows(Precopy) && !p.allows(Switchover) && !p.allows(Setup));
        }
        assert!(!Switchover.is_committed());
        assert!(
            Precopy.advance(Committed).is_err(),
            "commit needs a switchover"
        );
        assert!(Completed.advance(Failed).is_err() && Failed.advance(Failed).is_err());
    }

    #[test]
    fn reported_phases() {
        assert_eq!(Committed.reported(), Phase::Switchover);
        assert_eq!(Postcopy.reported(), Phase::Postcopy);
        assert_eq!(Failed.to_string(), "failed");
    }
}
