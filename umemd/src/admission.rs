//! Which local clients umemd serves and how many sessions at once: the allow list (the same
//! check as a VMM's control socket, [`proto::peercred`]), a deadline for the opening message,
//! and caps on sessions per daemon and per client uid, so that one local user cannot take
//! every thread, descriptor and byte of memory umemd has from the VMs of others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::peercred::{AllowList, Peer, TrustError};

/// What a client gets before its session starts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Who is served.
    pub allow: AllowList,
    /// How long a client may take to send its whole opening message.
    pub opening_timeout: Duration,
    /// Sessions at once, over all clients.
    pub max_sessions: usize,
    /// Sessions at once of one client uid.
    pub max_sessions_per_uid: usize,
}

/// Default of `--opening-timeout-ms`: a VMM sends its opening message right after connecting.
pub const DEFAULT_OPENING_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `--max-sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// Default of `--max-sessions-per-uid`.
pub const DEFAULT_MAX_SESSIONS_PER_UID: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            allow: AllowList::for_this_process(Vec::new(), Vec::new()),
            opening_timeout: DEFAULT_OPENING_TIMEOUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_uid: DEFAULT_MAX_SESSIONS_PER_UID,
        }
    }
}

/// A session over a cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// umemd serves as many sessions as it may.
    #[error(
        "umemd already serves {max} sessions, its limit (--max-sessions); try again when one ends"
    )]
    Daemon {
        /// The cap.
        max: usize,
    },
    /// This uid has as many sessions as it may.
    #[error("uid {uid} already has {max} sessions on umemd, its limit (--max-sessions-per-uid); try again when one ends")]
    PerUid {
        /// The client's uid.
        uid: u32,
        /// The cap.
        max: usize,
    },
}

/// Why a client gets no session.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// Not on the allow list, or its credentials could not be read.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// Over a session cap.
    #[error(transparent)]
    Cap(#[from] CapError),
}

/// The sessions umemd serves, counted per daemon and per client uid.
#[derive(Debug)]
pub struct SessionSlots {
    max_total: usize,
    max_per_uid: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

impl SessionSlots {
    /// No session yet; at most `max_total` at once, `max_per_uid` of one uid.
    pub fn new(max_total: usize, max_per_uid: usize) -> Arc<Self> {
        Arc::new(SessionSlots {
            max_total,
            max_per_uid,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding the lock: each update is
        // one step.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a session of `uid`, held until the returned guard drops.
    pub fn take(self: &Arc<Self>, uid: u32) -> Result<SessionSlot, CapError> {
        let mut c = self.counts();
        if c.total >= self.max_total {
            return Err(CapError::Daemon {
                max: self.max_total,
            });
        }
        let mine = c.per_uid.entry(uid).or_insert(0);
        if *mine >= self.max_per_uid {
            return Err(CapError::PerUid {
                uid,
                max: self.max_per_uid,
            });
        }
        *mine += 1;
        c.total += 1;
        Ok(SessionSlot {
            slots: self.clone(),
            uid,
        })
    }

    /// Sessions now, over all clients.
    pub fn in_use(&self) -> usize {
        self.counts().total
    }

    /// Sessions now of `uid`.
    pub fn in_use_by(&self, uid: u32) -> usize {
        self.counts().per_uid.get(&uid).copied().unwrap_or(0)
    }
}

/// One session's place in [`SessionSlots`], given back when the session ends (also when it
/// panicked: the guard lives outside the session's `catch_unwind`).
#[derive(Debug)]
pub struct SessionSlot {
    slots: Arc<SessionSlots>,
    uid: u32,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Decides whether `peer` gets a session: on the allow list, and under both caps.
pub fn admit(
    peer: &Peer,
    limits: &Limits,
    slots: &Arc<SessionSlots>,
) -> Result<SessionSlot, AdmissionError> {
    limits.allow.check(peer, "umemd")?;
    Ok(slots.take(peer.uid)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 1,
        }
    }

    #[test]
    fn per_uid_cap_refuses_the_next_and_frees_on_drop() {
        let s = SessionSlots::new(10, 2);
        let a = s.take(1000).unwrap();
        let _b = s.take(1000).unwrap();
        let e = s.take(1000).unwrap_err();
        assert_eq!(e, CapError::PerUid { uid: 1000, max: 2 });
        assert!(e.to_string().contains("--max-sessions-per-uid"), "{e}");
        // Another uid is not held back by the first one's sessions.
        let _c = s.take(1001).unwrap();
        assert_eq!(
            (s.in_use(), s.in_use_by(1000), s.in_use_by(1001)),
            (3, 2, 1)
        );
        drop(a);
        assert_eq!(s.in_use_by(1000), 1);
        let _d = s.take(1000).unwrap();
    }

    #[test]
    fn daemon_cap_counts_every_uid() {
        let s = SessionSlots::new(3, 2);
        let held: Vec<_> = [1, 2, 3].iter().map(|&u| s.take(u).unwrap()).collect();
        let e = s.take(4).unwrap_err();
        assert_eq!(e, CapError::Daemon { max: 3 });
        assert!(e.to_string().contains("--max-sessions"), "{e}");
        drop(held);
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.in_use_by(1), 0);
        assert!(s.take(4).is_ok());
    }

    #[test]
    fn a_slot_is_given_back_when_its_session_panics() {
        let s = SessionSlots::new(1, 1);
        let slot = s.take(5).unwrap();
        let r = std::thread::spawn(move || {
            let _slot = slot;
            panic!("a session bug");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(s.in_use(), 0);
        assert!(s.take(5).is_ok());
    }

    #[test]
    fn admission_checks_the_allow_list_before_the_caps() {
        let limits = Limits {
            allow: AllowList::new(0, vec![1000], vec![]),
            max_sessions: 1,
            max_sessions_per_uid: 1,
            ..Limits::default()
        };
        let s = SessionSlots::new(limits.max_sessions, limits.max_sessions_per_uid);
        let e = admit(&peer(2000), &limits, &s).unwrap_err();
        assert!(matches!(e, AdmissionError::Trust(_)), "{e}");
        assert_eq!(s.in_use(), 0, "a refused client holds no slot");
        let held = admit(&peer(1000), &limits, &s).unwrap();
        let e = admit(&peer(0), &limits, &s).unwrap_err();
        assert!(
            matches!(e, AdmissionError::Cap(CapError::Daemon { .. })),
            "{e}"
        );
        drop(held);
        assert!(admit(&peer(0), &limits, &s).is_ok());
    }
}
