//! The phases of an incoming migration and the transitions between them.
//!
//! ```text
//! Setup ──▶ Precopy ──▶ Switchover ──▶ Loaded ──▶ Completed        (precopy)
//!                                        └──▶ Postcopy ──▶ Completed (postcopy)
//!                                               ▲  │
//!                               PostcopyPaused ─┘ ◀┘ (the link lost, then back)
//!                          any phase but the last two ──▶ Failed
//! ```
//!
//! The VM runs only from the source's `Commit`, which moves `Loaded` on.

use std::fmt;

use proto::Phase;

pub use crate::phase::Transitions;

/// Where an incoming migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestPhase {
    /// Listening, accepting the source, handshake and layout.
    Setup,
    /// Receiving pages before the switchover.
    Precopy,
    /// The source announced the switchover; the machine state comes next.
    Switchover,
    /// The VMM loaded the machine state, which waits for the source's commit; the VM does not
    /// run.
    Loaded,
    /// The source committed and the VM runs here; missing pages are fetched and placed.
    Postcopy,
    /// Postcopy lost its link: the VM runs on the pages it has, and the destination waits for
    /// the source to connect again.
    PostcopyPaused,
    /// Every page is here and the VM runs.
    Completed,
    /// The migration failed.
    Failed,
}

/// An illegal transition between two phases of this role.
pub type PhaseError = crate::phase::PhaseError<DestPhase>;

impl Transitions for DestPhase {
    fn allows(self, next: Self) -> bool {
        use DestPhase::*;
        matches!(
            (self, next),
            (Setup, Precopy)
                | (Precopy, Switchover)
                | (Switchover, Loaded)
                | (Loaded, Postcopy)
                | (Loaded, Completed)
                | (Postcopy, Completed)
                | (Postcopy, PostcopyPaused)
                | (PostcopyPaused, Postcopy)
                // A umemd started again takes over a postcopy whose VM runs here.
                | (Setup, PostcopyPaused)
                | (
                    Setup | Precopy | Switchover | Loaded | Postcopy | PostcopyPaused,
                    Failed
                )
        )
    }
}

impl DestPhase {
    /// True once the VMM holds the machine state (whether or not the VM runs yet).
    pub fn state_loaded(self) -> bool {
        matches!(
            self,
            DestPhase::Loaded | DestPhase::Postcopy | DestPhase::PostcopyPaused
        )
    }

    /// True while the VM runs with pages still missing: pages are placed only with
    /// `UFFDIO_COPY`.
    pub fn running(self) -> bool {
        matches!(self, DestPhase::Postcopy | DestPhase::PostcopyPaused)
    }

    /// The phase as `query-migrate` reports it.
    pub fn reported(self) -> Phase {
        match self {
            DestPhase::Setup => Phase::Setup,
            DestPhase::Precopy => Phase::Precopy,
            DestPhase::Switchover | DestPhase::Loaded => Phase::Switchover,
            DestPhase::Postcopy => Phase::Postcopy,
            DestPhase::PostcopyPaused => Phase::PostcopyPaused,
            DestPhase::Completed => Phase::Completed,
            DestPhase::Failed => Phase::Failed,
        }
    }

    /// Every phase, in order.
    pub const ALL: [DestPhase; 8] = [
        DestPhase::Setup,
        DestPhase::Precopy,
        DestPhase::Switchover,
        DestPhase::Loaded,
        DestPhase::Postcopy,
        DestPhase::PostcopyPaused,
        DestPhase::Completed,
        DestPhase::Failed,
    ];
}

impl fmt::Display for DestPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DestPhase::Setup => "setup",
            DestPhase::Precopy => "precopy",
            DestPhase::Switchover => "switchover",
            DestPhase::Loaded => "state loaded",
            DestPhase::Postcopy => "postcopy",
            DestPhase::PostcopyPaused => "postcopy-paused",
            DestPhase::Completed => "completed",
            DestPhase::Failed => "failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DestPhase::*;
    use super::*;

    #[test]
    fn transition_table() {
        let legal = [
            (Setup, Precopy),
            (Precopy, Switchover),
            (Switchover, Loaded),
            (Loaded, Postcopy),
            (Loaded, Completed),
            (Postcopy, Completed),
            (Postcopy, PostcopyPaused),
            (PostcopyPaused, Postcopy),
            (PostcopyPaused, Failed),
            (Setup, PostcopyPaused),
            (Setup, Failed),
            (Precopy, Failed),
            (Switchover, Failed),
            (Loaded, Failed),
            (Postcopy, Failed),
        ];
        crate::phase::assert_transitions(&DestPhase::ALL, &legal);
    }

    #[test]
    fn the_vm_runs_only_after_the_state_is_loaded() {
        assert!(!Switchover.allows(Postcopy) && !Precopy.allows(Completed));
        assert!(Loaded.state_loaded() && !Loaded.running());
        assert!(Postcopy.state_loaded() && Postcopy.running());
        assert!(!Switchover.state_loaded());
        assert!(
            PostcopyPaused.running(),
            "a paused postcopy VM runs on the pages it has"
        );
        assert_eq!(Loaded.reported(), Phase::Switchover);
    }
}
