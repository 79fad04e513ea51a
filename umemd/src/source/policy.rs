//! The precopy round policy: after each round, whether to send another, switch over, or move
//! to postcopy. A pure function of the round's numbers and the parameters.

use proto::{MigrationMode, MigrationParams, PAGE_SIZE};

/// Why the migration switches over (stops the guest and sends the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The pages left fit in the downtime limit at the measured throughput.
    Fits,
    /// `max_rounds` rounds have run.
    RoundLimit,
}

/// Why the migration moves to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyReason {
    /// `migrate-start-postcopy` asked for it.
    Requested,
    /// A hybrid migration ran its `postcopy_after_rounds` rounds.
    AfterRounds,
    /// A hybrid migration's last round did not shrink what is left to send.
    NotConverging,
    /// A hybrid migration reached `max_rounds`.
    RoundLimit,
}

/// What follows a precopy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundDecision {
    /// Send the pages dirtied meanwhile in another round.
    AnotherRound,
    /// Stop the guest and send the rest (precopy switchover).
    Switchover {
        /// Why.
        reason: SwitchoverReason,
    },
    /// Stop the guest, send its state and fetch the rest on demand.
    Postcopy {
        /// Why.
        reason: PostcopyReason,
    },
}

/// Microseconds that sending `pending_pages` takes at `bandwidth_bps` bytes per second.
pub fn expected_downtime_us(pending_pages: u64, bandwidth_bps: u64) -> u64 {
    ((pending_pages as u128 * PAGE_SIZE as u128 * 1_000_000) / bandwidth_bps.max(1) as u128)
        .min(u64::MAX as u128) as u64
}

/// Decides what follows round `round` (counted from 1), after which `pending_pages` are dirty
/// (`last_pending` after the round before, `u64::MAX` after the first), at a measured
/// throughput of `bandwidth_bps`.
pub fn next_step(
    round: u32,
    pending_pages: u64,
    last_pending: u64,
    bandwidth_bps: u64,
    params: &MigrationParams,
    start_postcopy_requested: bool,
) -> RoundDecision {
    let downtime = expected_downtime_us(pending_pages, bandwidth_bps);
    if downtime <= params.downtime_limit_ms as u64 * 1000 {
        return RoundDecision::Switchover {
            reason: SwitchoverReason::Fits,
        };
    }
    let hybrid = params.mode == MigrationMode::Hybrid;
    // Not converging: a round did not shrink what is left to send.
    let stuck = round >= 2 && pending_pages >= last_pending;
    let postcopy = |reason| RoundDecision::Postcopy { reason };
    if start_postcopy_requested {
        return postcopy(PostcopyReason::Requested);
    }
    if hybrid && round >= params.postcopy_after_rounds.max(1) {
        return postcopy(PostcopyReason::AfterRounds);
    }
    if hybrid && stuck {
        return postcopy(PostcopyReason::NotConverging);
    }
    if round >= params.max_rounds.max(1) {
        return if hybrid {
            postcopy(PostcopyReason::RoundLimit)
        } else {
            RoundDecision::Switchover {
                reason: SwitchoverReason::RoundLimit,
            }
        };
    }
    RoundDecision::AnotherRound
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 GB/s: 1000 pages take about 4 ms.
    const BW: u64 = 1_000_000_000;

    fn params(mode: MigrationMode, max_rounds: u32, postcopy_after_rounds: u32) -> MigrationParams {
        MigrationParams {
            mode,
            downtime_limit_ms: 10,
            max_rounds,
            postcopy_after_rounds,
            ..Default::default()
        }
    }

    fn another() -> RoundDecision {
        RoundDecision::AnotherRound
    }

    fn switchover(reason: SwitchoverReason) -> RoundDecision {
        RoundDecision::Switchover { reason }
    }

    fn postcopy(reason: PostcopyReason) -> RoundDecision {
        RoundDecision::Postcopy { reason }
    }

    #[test]
    fn what_fits_in_the_downtime_switches_over() {
        assert_eq!(expected_downtime_us(1000, BW), 4096);
        for mode in [MigrationMode::Precopy, MigrationMode::Hybrid] {
            let p = params(mode, 30, 5);
            assert_eq!(
                next_step(1, 1000, u64::MAX, BW, &p, false),
                switchover(SwitchoverReason::Fits)
            );
            // Even when postcopy was asked for: nothing is left that would need it.
            assert_eq!(
                next_step(3, 0, 0, BW, &p, true),
                switchover(SwitchoverReason::Fits)
            );
        }
        // No throughput measured yet: nothing but an empty round fits.
        let p = params(MigrationMode::Precopy, 30, 5);
        assert_eq!(next_step(1, 1, u64::MAX, 0, &p, false), another());
    }

    #[test]
    fn hybrid_moves_to_postcopy_after_its_rounds() {
        let p = params(MigrationMode::Hybrid, 30, 3);
        assert_eq!(next_step(1, 1 << 20, u64::MAX, BW, &p, false), another());
        assert_eq!(next_step(2, 1 << 19, 1 << 20, BW, &p, false), another());
        assert_eq!(
            next_step(3, 1 << 18, 1 << 19, BW, &p, false),
            postcopy(PostcopyReason::AfterRounds)
        );
    }

    #[test]
    fn postcopy_after_zero_rounds_counts_as_one() {
        let p = params(MigrationMode::Hybrid, 30, 0);
        assert_eq!(
            next_step(1, 1 << 20, u64::MAX, BW, &p, false),
            postcopy(PostcopyReason::AfterRounds)
        );
    }

    #[test]
    fn not_converging() {
        let hybrid = params(MigrationMode::Hybrid, 30, 10);
        let precopy = params(MigrationMode::Precopy, 30, 10);
        // The first round has nothing to compare with.
        assert_eq!(
            next_step(1, 1 << 20, u64::MAX, BW, &hybrid, false),
            another()
        );
        for pending in [1 << 20, (1 << 20) + 1] {
            assert_eq!(
                next_step(2, pending, 1 << 20, BW, &hybrid, false),
                postcopy(PostcopyReason::NotConverging)
            );
            assert_eq!(
                next_step(2, pending, 1 << 20, BW, &precopy, false),
                another()
            );
        }
        assert_eq!(
            next_step(2, (1 << 20) - 1, 1 << 20, BW, &hybrid, false),
            another()
        );
    }

    #[test]
    fn the_round_limit() {
        let precopy = params(MigrationMode::Precopy, 4, 10);
        let hybrid = params(MigrationMode::Hybrid, 4, 10);
        assert_eq!(
            next_step(3, 1 << 20, 1 << 21, BW, &precopy, false),
            another()
        );
        assert_eq!(
            next_step(4, 1 << 20, 1 << 21, BW, &precopy, false),
            switchover(SwitchoverReason::RoundLimit)
        );
        assert_eq!(
            next_step(4, 1 << 20, 1 << 21, BW, &hybrid, false),
            postcopy(PostcopyReason::RoundLimit)
        );
        // max_rounds 0 counts as 1.
        let once = params(MigrationMode::Precopy, 0, 10);
        assert_eq!(
            next_step(1, 1 << 20, u64::MAX, BW, &once, false),
            switchover(SwitchoverReason::RoundLimit)
        );
    }

    #[test]
    fn start_postcopy_is_obeyed() {
        for mode in [MigrationMode::Precopy, MigrationMode::Hybrid] {
            let p = params(mode, 30, 10);
            assert_eq!(
                next_step(1, 1 << 20, u64::MAX, BW, &p, true),
                postcopy(PostcopyReason::Requested)
            );
        }
    }
}
