//! What a failed session reports: the phase it failed in and why. The text the VMM gets in
//! `Failed { message }` (and the peer in its `Error`) is this error's `Display`.

use std::fmt;

/// A migration session's failure: `cause` happened in `phase`, displayed as
/// "<phase>: <cause>".
#[derive(Debug)]
pub struct SessionError<P, C> {
    /// The phase the migration was in.
    pub phase: P,
    /// Why it failed.
    pub cause: C,
}

impl<P: fmt::Display, C: fmt::Display> fmt::Display for SessionError<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.phase, self.cause)
    }
}

impl<P, C> std::error::Error for SessionError<P, C>
where
    P: fmt::Debug + fmt::Display,
    C: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_phase_then_cause() {
        let e = SessionError {
            phase: "precopy",
            cause: std::io::Error::other("broken"),
        };
        assert_eq!(e.to_string(), "precopy: broken");
    }
}
