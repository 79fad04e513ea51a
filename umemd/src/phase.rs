//! What the phase enums of both roles share: a transition table, the step that obeys it, and
//! the error for a transition it does not allow.

use std::fmt;

/// A role's phases and the transitions allowed between them.
pub trait Transitions: Copy + PartialEq + fmt::Debug + fmt::Display {
    /// True if `self` may be followed by `next`.
    fn allows(self, next: Self) -> bool;

    /// The phase after `self`, if the transition is legal.
    fn advance(self, next: Self) -> Result<Self, PhaseError<Self>> {
        if self.allows(next) {
            Ok(next)
        } else {
            Err(PhaseError {
                from: self,
                to: next,
            })
        }
    }
}

/// An illegal phase transition: a bug in the session driver, reported rather than obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {from} to {to}")]
pub struct PhaseError<P: fmt::Debug + fmt::Display> {
    /// The phase the migration was in.
    pub from: P,
    /// The phase asked for.
    pub to: P,
}

/// Checks `allows` and `advance` for every pair of `all` against the list of `legal` ones.
#[cfg(test)]
pub fn assert_transitions<P: Transitions>(all: &[P], legal: &[(P, P)]) {
    for &from in all {
        for &to in all {
            let want = legal.contains(&(from, to));
            assert_eq!(from.allows(to), want, "{from} -> {to}");
            match from.advance(to) {
                Ok(p) => assert!(want && p == to, "{from} -> {to}"),
                Err(e) => assert_eq!((want, e), (false, PhaseError { from, to })),
            }
        }
    }
}
