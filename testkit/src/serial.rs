//! memtouch's serial output: its `pass=N bad=B total_bad=T` lines, and the checks every test
//! makes on them.

/// One memtouch `pass=N bad=B total_bad=T` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Pass number.
    pub pass: u64,
    /// Bad pages in this pass.
    pub bad: u64,
    /// Bad pages so far.
    pub total_bad: u64,
}

/// Parses the complete (newline-terminated) memtouch pass lines of `text`.
pub fn parse_passes(text: &str) -> Vec<Pass> {
    complete_lines(text)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let num = |tok: Option<&str>, key: &str| -> Option<u64> {
                tok?.strip_prefix(key)?.strip_prefix('=')?.parse().ok()
            };
            let p = Pass {
                pass: num(it.next(), "pass")?,
                bad: num(it.next(), "bad")?,
                total_bad: num(it.next(), "total_bad")?,
            };
            it.next().is_none().then_some(p)
        })
        .collect()
}

/// The newline-terminated lines of `text` (a trailing partial line is left out).
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// Asserts that every memtouch pass in `passes` found no bad page.
pub fn assert_no_bad(who: &str, passes: &[Pass]) {
    if let Some(p) = passes.iter().find(|p| p.bad != 0 || p.total_bad != 0) {
        panic!("{who}: memtouch found corrupted pages: {p:?}");
    }
}

/// Asserts that pass numbers go up by exactly one from line to line.
pub fn assert_consecutive(who: &str, passes: &[Pass]) {
    for w in passes.windows(2) {
        assert_eq!(
            w[1].pass,
            w[0].pass + 1,
            "{who}: memtouch pass numbers jump from {} to {}",
            w[0].pass,
            w[1].pass
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_well_formed_pass_lines_count() {
        let text = "memtouch base=0x1000000 pages=4096\n\
                    pass=1 bad=0 total_bad=0\n\
                    pass=2 bad=3 total_bad=3 extra\n\
                    pass=3 bad=1 total_bad=4\n\
                    pass=4 bad=0 tot";
        assert_eq!(
            parse_passes(text),
            vec![
                Pass {
                    pass: 1,
                    bad: 0,
                    total_bad: 0
                },
                Pass {
                    pass: 3,
                    bad: 1,
                    total_bad: 4
                },
            ]
        );
        assert_eq!(complete_lines("a\nb\nc").collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    #[should_panic(expected = "jump from 1 to 3")]
    fn a_gap_in_pass_numbers_is_caught() {
        let p = |n| Pass {
            pass: n,
            bad: 0,
            total_bad: 0,
        };
        assert_consecutive("guest", &[p(1), p(3)]);
    }

    #[test]
    #[should_panic(expected = "corrupted pages")]
    fn a_bad_page_is_caught() {
        let passes = [Pass {
            pass: 1,
            bad: 0,
            total_bad: 2,
        }];
        assert_no_bad("guest", &passes);
    }
}
