//! Statistics helpers shared by both roles.

use std::time::Duration;

/// `amount` per second over `over`; 0 for an empty interval.
pub fn rate(amount: u64, over: Duration) -> u64 {
    let us = over.as_micros() as u64;
    if us == 0 {
        0
    } else {
        ((amount as u128 * 1_000_000) / us as u128) as u64
    }
}
