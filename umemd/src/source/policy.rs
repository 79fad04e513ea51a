//! The precopy round policy: after each round, whether to send another, switch over, move to
//! postcopy or give up; and the time limits that end a precopy early. Pure functions of the
//! round's numbers, the time and the parameters.

use std::time::Duration;

use proto::{MigrationMode, MigrationParams, TimeoutAction, PAGE_SIZE};

/// Why the migration switches over (stops the guest and sends the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverReason {
    /// The pages left fit in the downtime limit at the measured throughput.
    Fits,
    /// `max_rounds` rounds have run.
    RoundLimit,
    /// The precopy ran past `precopy_timeout_ms` (action `suspend`, or a destination that
    /// cannot run postcopy).
    PrecopyTimeout,
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
    /// The precopy ran past `precopy_timeout_ms` with action `postcopy`.
    PrecopyTimeout,
    /// A hybrid migration ran past its completion timeout.
    CompletionTimeout,
}

/// Why the migration is given up while the guest still runs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A migration whose mode does not allow postcopy ran past its completion timeout.
    CompletionTimeout {
        /// The limit it ran past.
        limit: Duration,
    },
}

/// A time limit the precopy ran past, and what it calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    /// `precopy_timeout_ms` passed: switch over as the action says.
    PrecopyTimeout(TimeoutAction),
    /// The completion timeout passed.
    CompletionTimeout {
        /// The limit, from `completion_timeout_per_gib_s` and the size of guest RAM.
        limit: Duration,
    },
}

/// The longest a migration of `ram_bytes` of guest RAM may take under
/// `completion_timeout_per_gib_s`, in proportion to the RAM; `None` when there is no limit.
pub fn completion_limit(params: &MigrationParams, ram_bytes: u64) -> Option<Duration> {
    if params.completion_timeout_per_gib_s == 0 {
        return None;
    }
    let ms = params.completion_timeout_per_gib_s as u128 * ram_bytes as u128 * 1000 / (1 << 30);
    Some(Duration::from_millis(ms.min(u64::MAX as u128) as u64))
}

/// The time limit a precopy `elapsed` into its migration has run past, if any: the one that
/// passed first when both have.
pub fn overdue(elapsed: Duration, ram_bytes: u64, params: &MigrationParams) -> Option<Overdue> {
    let precopy = (params.precopy_timeout_ms > 0)
        .then(|| Duration::from_millis(params.precopy_timeout_ms as u64))
        .filter(|t| elapsed >= *t);
    let completion = completion_limit(params, ram_bytes).filter(|t| elapsed >= *t);
    match (precopy, completion) {
        (Some(p), Some(c)) if c < p => Some(Overdue::CompletionTimeout { limit: c }),
        (Some(_), _) => Some(Overdue::PrecopyTimeout(params.precopy_timeout_action)),
        (None, Some(c)) => Some(Overdue::CompletionTimeout { limit: c }),
        (None, None) => None,
    }
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
    /// Give the migration up; the guest runs on here.
    Cancel {
        /// Why.
        reason: CancelReason,
    },
}

/// Microseconds that sending `pending_pages` takes at `bandwidth_bps` bytes per second.
pub fn expected_downtime_us(pending_pages: u64, bandwidth_bps: u64) -> u64 {
    ((pending_pages as u128 * PAGE_SIZE as u128 * 1_000_000) / bandwidth_bps.max(1) as u128)
        .min(u64::MAX as u128) as u64
}

/// What the precopy's end looks like after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round just ended, counted from 1.
    pub round: u32,
    /// Pages dirty now.
    pub pending_pages: u64,
    /// Pages dirty after the round before (`u64::MAX` after the first).
    pub last_pending: u64,
    /// Measured throughput, bytes per second.
    pub bandwidth_bps: u64,
    /// `migrate-start-postcopy` was asked for.
    pub start_postcopy_requested: bool,
    /// The destination can run postcopy.
    pub dest_postcopy: bool,
    /// The time limit the migration has run past, if any (see [`overdue`]).
    pub overdue: Option<Overdue>,
}

/// Decides what follows a precopy round.
///
/// What fits in the downtime limit always switches over: it ends the migration soonest. A time
/// limit comes next; then a hybrid migration's rounds, its convergence and the round limit.
pub fn next_step(end: &RoundEnd, params: &MigrationParams) -> RoundDecision {
    let RoundEnd {
        round,
        pending_pages,
        last_pending,
        bandwidth_bps,
        start_postcopy_requested,
        dest_postcopy,
        overdue,
    } = *end;
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
    match overdue {
        Some(Overdue::PrecopyTimeout(TimeoutAction::Postcopy)) if dest_postcopy => {
            return postcopy(PostcopyReason::PrecopyTimeout)
        }
        Some(Overdue::PrecopyTimeout(_)) => {
            return RoundDecision::Switchover {
                reason: SwitchoverReason::PrecopyTimeout,
            }
        }
        // Postcopy is allowed only where the operator chose a mode that moves to it.
        Some(Overdue::CompletionTimeout { .. }) if hybrid && dest_postcopy => {
            return postcopy(PostcopyReason::CompletionTimeout)
        }
        Some(Overdue::CompletionTimeout { limit }) => {
            return RoundDecision::Cancel {
                reason: CancelReason::CompletionTimeout { limit },
            }
        }
        None => {}
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

    /// The decision after a round, towards a postcopy-capable destination, no time limit passed.
    fn step(
        round: u32,
        pending_pages: u64,
        last_pending: u64,
        bandwidth_bps: u64,
        params: &MigrationParams,
        start_postcopy_requested: bool,
    ) -> RoundDecision {
        next_step(
            &RoundEnd {
                round,
                pending_pages,
                last_pending,
                bandwidth_bps,
                start_postcopy_requested,
                dest_postcopy: true,
                overdue: None,
            },
            params,
        )
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
                step(1, 1000, u64::MAX, BW, &p, false),
                switchover(SwitchoverReason::Fits)
            );
            // Even when postcopy was asked for: nothing is left that would need it.
            assert_eq!(
                step(3, 0, 0, BW, &p, true),
                switchover(SwitchoverReason::Fits)
            );
        }
        // No throughput measured yet: nothing but an empty round fits.
        let p = params(MigrationMode::Precopy, 30, 5);
        assert_eq!(step(1, 1, u64::MAX, 0, &p, false), another());
    }

    #[test]
    fn hybrid_moves_to_postcopy_after_its_rounds() {
        let p = params(MigrationMode::Hybrid, 30, 3);
        assert_eq!(step(1, 1 << 20, u64::MAX, BW, &p, false), another());
        assert_eq!(step(2, 1 << 19, 1 << 20, BW, &p, false), another());
        assert_eq!(
            step(3, 1 << 18, 1 << 19, BW, &p, false),
            postcopy(PostcopyReason::AfterRounds)
        );
    }

    #[test]
    fn postcopy_after_zero_rounds_counts_as_one() {
        let p = params(MigrationMode::Hybrid, 30, 0);
        assert_eq!(
            step(1, 1 << 20, u64::MAX, BW, &p, false),
            postcopy(PostcopyReason::AfterRounds)
        );
    }

    #[test]
    fn not_converging() {
        let hybrid = params(MigrationMode::Hybrid, 30, 10);
        let precopy = params(MigrationMode::Precopy, 30, 10);
        // The first round has nothing to compare with.
        assert_eq!(step(1, 1 << 20, u64::MAX, BW, &hybrid, false), another());
        for pending in [1 << 20, (1 << 20) + 1] {
            assert_eq!(
                step(2, pending, 1 << 20, BW, &hybrid, false),
                postcopy(PostcopyReason::NotConverging)
            );
            assert_eq!(step(2, pending, 1 << 20, BW, &precopy, false), another());
        }
        assert_eq!(
            step(2, (1 << 20) - 1, 1 << 20, BW, &hybrid, false),
            another()
        );
    }

    #[test]
    fn the_round_limit() {
        let precopy = params(MigrationMode::Precopy, 4, 10);
        let hybrid = params(MigrationMode::Hybrid, 4, 10);
        assert_eq!(step(3, 1 << 20, 1 << 21, BW, &precopy, false), another());
        assert_eq!(
            step(4, 1 << 20, 1 << 21, BW, &precopy, false),
            switchover(SwitchoverReason::RoundLimit)
        );
        assert_eq!(
            step(4, 1 << 20, 1 << 21, BW, &hybrid, false),
            postcopy(PostcopyReason::RoundLimit)
        );
        // max_rounds 0 counts as 1.
        let once = params(MigrationMode::Precopy, 0, 10);
        assert_eq!(
            step(1, 1 << 20, u64::MAX, BW, &once, false),
            switchover(SwitchoverReason::RoundLimit)
        );
    }

    #[test]
    fn start_postcopy_is_obeyed() {
        for mode in [MigrationMode::Precopy, MigrationMode::Hybrid] {
            let p = params(mode, 30, 10);
            assert_eq!(
                step(1, 1 << 20, u64::MAX, BW, &p, true),
                postcopy(PostcopyReason::Requested)
            );
        }
    }

    const GIB: u64 = 1 << 30;

    fn timed(precopy_timeout_ms: u32, action: TimeoutAction, per_gib_s: u32) -> MigrationParams {
        MigrationParams {
            precopy_timeout_ms,
            precopy_timeout_action: action,
            completion_timeout_per_gib_s: per_gib_s,
            ..Default::default()
        }
    }

    #[test]
    fn the_completion_limit_is_in_proportion_to_ram() {
        let p = timed(0, TimeoutAction::Suspend, 150);
        assert_eq!(completion_limit(&p, GIB), Some(Duration::from_secs(150)));
        assert_eq!(
            completion_limit(&p, 4 * GIB),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            completion_limit(&p, 64 << 20),
            Some(Duration::from_millis(9375))
        );
        assert_eq!(completion_limit(&MigrationParams::default(), GIB), None);
    }

    #[test]
    fn time_limits_fire_once_passed_and_the_first_passed_wins() {
        let secs = Duration::from_secs;
        // 3 s of precopy, 2 s per GiB on 2 GiB: 4 s.
        let p = timed(3000, TimeoutAction::Postcopy, 2);
        assert_eq!(overdue(secs(2), 2 * GIB, &p), None);
        assert_eq!(
            overdue(secs(3), 2 * GIB, &p),
            Some(Overdue::PrecopyTimeout(TimeoutAction::Postcopy))
        );
        assert_eq!(
            overdue(secs(5), 2 * GIB, &p),
            Some(Overdue::PrecopyTimeout(TimeoutAction::Postcopy))
        );
        // 1 s per GiB on 2 GiB: 2 s, before the precopy timeout.
        let p = timed(3000, TimeoutAction::Suspend, 1);
        let completion = Some(Overdue::CompletionTimeout { limit: secs(2) });
        assert_eq!(overdue(secs(2), 2 * GIB, &p), completion);
        assert_eq!(overdue(secs(9), 2 * GIB, &p), completion);
        // No limit set: never overdue.
        assert_eq!(
            overdue(secs(1 << 30), GIB, &MigrationParams::default()),
            None
        );
    }

    fn overdue_step(
        mode: MigrationMode,
        dest_postcopy: bool,
        pending_pages: u64,
        overdue: Overdue,
    ) -> RoundDecision {
        let p = params(mode, 30, 30);
        next_step(
            &RoundEnd {
                round: 1,
                pending_pages,
                last_pending: u64::MAX,
                bandwidth_bps: BW,
                start_postcopy_requested: false,
                dest_postcopy,
                overdue: Some(overdue),
            },
            &p,
        )
    }

    #[test]
    fn the_precopy_timeout_does_its_action() {
        use MigrationMode::*;
        let suspend = Overdue::PrecopyTimeout(TimeoutAction::Suspend);
        let to_postcopy = Overdue::PrecopyTimeout(TimeoutAction::Postcopy);
        for mode in [Precopy, Hybrid] {
            assert_eq!(
                overdue_step(mode, true, 1 << 20, suspend),
                switchover(SwitchoverReason::PrecopyTimeout)
            );
            assert_eq!(
                overdue_step(mode, true, 1 << 20, to_postcopy),
                postcopy(PostcopyReason::PrecopyTimeout)
            );
            // A destination without postcopy: the guest is suspended instead.
            assert_eq!(
                overdue_step(mode, false, 1 << 20, to_postcopy),
                switchover(SwitchoverReason::PrecopyTimeout)
            );
            // What fits switches over as ever.
            assert_eq!(
                overdue_step(mode, true, 10, to_postcopy),
                switchover(SwitchoverReason::Fits)
            );
        }
    }

    #[test]
    fn the_completion_timeout_moves_to_postcopy_where_allowed_else_cancels() {
        use MigrationMode::*;
        let limit = Duration::from_secs(2);
        let late = Overdue::CompletionTimeout { limit };
        let cancel = RoundDecision::Cancel {
            reason: CancelReason::CompletionTimeout { limit },
        };
        assert_eq!(
            overdue_step(Hybrid, true, 1 << 20, late),
            postcopy(PostcopyReason::CompletionTimeout)
        );
        assert_eq!(overdue_step(Precopy, true, 1 << 20, late), cancel);
        assert_eq!(overdue_step(Hybrid, false, 1 << 20, late), cancel);
        assert_eq!(
            overdue_step(Precopy, true, 10, late),
            switchover(SwitchoverReason::Fits)
        );
    }
}
