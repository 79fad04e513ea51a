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

/// An illegal phase transition: a bug in the session driver, reported rather than obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from} to {to}")]
pub struct PhaseError {
    /// The phase the migration was in.
    pub from: SourcePhase,
    /// The phase asked for.
    pub to: SourcePhase,
}

impl SourcePhase {
    /// True if `self` may be followed by `next`.
    pub fn allows(self, next: SourcePhase) -> bool {
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

    /// The phase after `self`, if the transition is legal.
    pub fn advance(self, next: SourcePhase) -> Result<SourcePhase, PhaseError> {
        if self.allows(next) {
            Ok(next)
        } else {
            Err(PhaseError {
                from: self,
                to: next,
            })
        }
    }

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
        for from in SourcePhase::ALL {
            for to in SourcePhase::ALL {
                let want = legal.contains(&(from, to));
                assert_eq!(from.allows(to), want, "{from} -> {to}");
                match from.advance(to) {
                    Ok(p) => assert!(want && p == to, "{from} -> {to}"),
                    Err(e) => assert_eq!((want, e), (false, PhaseError { from, to })),
                }
            }
        }
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
