//! A hostile source against a real destination: a `vmm --incoming` and its umemd, and a peer
//! (`umem_testkit::hostile`) that sends what no real source would. After each hostile peer the
//! destination must:
//! - turn it away at the door if it fails before it is admitted (authentication and its
//!   first message): the reason in umemd's log, the session still waiting for its source;
//!   or, once admitted as the source, fail that attempt with the problem named
//!   (`query-migrate`);
//! - never have run the VM, and hold guest RAM as it was (zeroed, before any migration);
//! - keep its umemd alive, serving, and within a bound of resident memory;
//! - take the next source where it listened.
//!
//! Neighbours: `tests/link_failures.rs` has a source that falls silent after its handshake and
//! one that trickles its `Hello` (the slow-loris here trickles the whole opening);
//! `tests/switchover.rs` loses single messages of a real migration's switchover;
//! `tests/umemd_clients.rs` misbehaves on umemd's local socket rather than the peer stream.
//!
//! Run with `cargo test --release --test hostile_source -- --test-threads=1`.

use std::time::{Duration, Instant};

use proto::peer::{kind, PageRun, PeerMessage, MAX_DISCARD_RANGES, MAX_ERROR_LEN, MAX_RUN_PAGES};
use proto::{MAX_FRAME, PAGE_SIZE};
use serde_json::{json, Value};
use umem_testkit::hostile::{capture_machine_state, low_ram_layout, HostileSource, Opening, Reply};
use umem_testkit::pair::{
    assert_completed, assert_guest_runs_on, assert_same_ram, MigrationSetup, MEMTOUCH_CMDLINE,
};
use umem_testkit::{
    require_huge_pages, require_kvm, secs, wait_until, RamFileDigest, TestEnv, Umemd, Vmm,
};

/// The destination's size: small, so that a failed attempt's reset is quick.
const MEM: &str = "64M";
const MEM_BYTES: u64 = 64 << 20;
const PAGES: u64 = MEM_BYTES / PAGE_SIZE;

/// How much umemd's resident memory may grow over a test, now or at its peak. A peer makes
/// umemd hold one frame body at a time (at most `MAX_FRAME`, 8 MiB) in up to three copies (as
/// read, decoded, and re-framed for the vmm) beside its session's 1 MiB run buffer, and the
/// allocator may keep freed buffers for the next session's thread: a few times 8 MiB is normal.
/// 64 MiB is eight whole frames: only memory kept per connection reaches it, and the limits
/// test sends nine frames of `MAX_FRAME`.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 << 10;

/// umemd's deadline for a source's whole opening exchange (`HANDSHAKE_TIMEOUT`).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The lines of umemd's log that say it dropped a connection at the door.
fn dropped_lines(umemd: &Umemd) -> Vec<String> {
    umemd
        .proc
        .log()
        .lines()
        .filter(|l| l.contains("dropped a connection"))
        .map(str::to_string)
        .collect()
}

/// How long a hostile peer waits for the destination's answer to what it sent.
fn reply_timeout() -> Duration {
    secs(15)
}

/// The destination under attack: its umemd and a vmm waiting with `--incoming`, with what they
/// were before any hostile peer came.
struct Target {
    umemd: Umemd,
    dst: Vmm,
    uri: String,
    ram0: RamFileDigest,
    rss0_kib: u64,
    /// Incoming migrations that failed so far.
    failures: u64,
    /// Connections umemd dropped at the door so far (its log says each).
    turned_away: usize,
    /// `query-migrate` as the last failure left it (its statistics are the failed attempt's).
    last_failure: Value,
}

impl Target {
    /// A umemd `umemd-dst` and a vmm `dst` of [`MEM`] listening on a port umemd picks. With
    /// `paused` it waits with `-S` after a migration, which only the commit test wants: every
    /// other test would see a VM that ran, and must not.
    fn start(t: &TestEnv, paused: bool) -> Target {
        Self::start_on(t, paused, false)
    }

    /// [`Self::start`], guest RAM on 2 MiB huge pages with `hugepages`.
    fn start_on(t: &TestEnv, paused: bool, hugepages: bool) -> Target {
        let umemd = t.umemd("umemd-dst");
        let mut dst = t
            .vmm("dst", &umemd)
            .mem(MEM)
            .incoming_any()
            .paused(paused)
            .hugepages(hugepages)
            .start();
        let uri = dst.listen_uri();
        let ram0 = dst.ram_file_digest();
        assert_eq!(
            (ram0.len, ram0.nonzero_pages),
            (MEM_BYTES, 0),
            "a destination before any migration holds zeroed RAM"
        );
        let rss0_kib = umemd.rss_kib();
        Target {
            umemd,
            dst,
            uri,
            ram0,
            rss0_kib,
            failures: 0,
            turned_away: 0,
            last_failure: Value::Null,
        }
    }

    /// A hostile source, through the opening exchange up to `upto`.
    fn open(&self, upto: Opening) -> HostileSource {
        HostileSource::open(&self.uri, &low_ram_layout(MEM_BYTES), upto)
            .unwrap_or_else(|e| panic!("opening a hostile source: {e}"))
    }

    /// One hostile peer: opens up to `upto`, lets `act` misbehave, then expects it refused
    /// (see [`Self::check_refusal`]). Returns the error the vmm reports.
    fn attack(
        &mut self,
        what: &str,
        upto: Opening,
        names: &[&str],
        act: impl FnOnce(&mut HostileSource),
    ) -> String {
        let mut peer = self.open(upto);
        act(&mut peer);
        let reply = peer.next_reply(reply_timeout());
        drop(peer);
        self.check_refusal(what, reply, names)
    }

    /// The destination answered a hostile peer with `reply`: an `Error` or the end of the
    /// connection, never anything that goes on; and it is still usable, its error naming one
    /// of `names`. Returns the error the vmm reports.
    fn check_refusal(&mut self, what: &str, reply: Reply, names: &[&str]) -> String {
        let error = self.assert_destination_still_usable(what, names);
        // The source hears the same reason, when the destination could still tell it (a
        // reset that outruns its Error is fine: it closed on the source either way). Where the
        // vmm itself refused, umemd passes its words on inside its own.
        match &reply {
            Reply::Message(PeerMessage::Error(text)) => assert!(
                error.contains(text.as_str()) || text.contains(&error),
                "{what}: the source was told {text:?}, the VMM {error:?}"
            ),
            Reply::Closed(_) => {}
            other => panic!("{what}: the destination answered {other:?} instead of failing"),
        }
        error
    }

    /// After a hostile peer made the incoming migration fail: the VMM says why, naming one of
    /// `names`; the VM never ran; guest RAM is as before; umemd lives, serves and stays within
    /// its memory bound; and the destination takes the next source where it listened. Returns
    /// the error the VMM reports.
    fn assert_destination_still_usable(&mut self, what: &str, names: &[&str]) -> String {
        // A peer that fails before it is admitted (authentication and its first message) is
        // turned away at the door and the session goes on waiting; one admitted as the source
        // that misbehaves later fails that attempt, and the vmm listens anew.
        let (failures, turned_away) = (self.failures, self.turned_away);
        let dst = &self.dst;
        let umemd = &self.umemd;
        let (v, dropped) = wait_until(secs(20), "the destination to refuse the peer", || {
            let v = dst.query_migrate();
            let dropped = dropped_lines(umemd);
            (v["failed_attempts"].as_u64() > Some(failures) || dropped.len() > turned_away)
                .then_some((v, dropped))
        });
        let error = if v["failed_attempts"].as_u64() > Some(failures) {
            self.failures += 1;
            let v = self.dst.wait_incoming_failures(secs(20), self.failures);
            eprintln!(
                "{what}: destination reports {:?}: {}",
                v["phase"], v["error"]
            );
            self.last_failure = v.clone();
            v["error"].as_str().unwrap_or_default().to_string()
        } else {
            self.turned_away = dropped.len();
            let line = dropped.last().cloned().unwrap_or_default();
            eprintln!("{what}: turned away at the door: {line}");
            let v = self.dst.query_migrate();
            assert_eq!(v["phase"], "setup", "{what}: {v}");
            line
        };
        let lower = error.to_lowercase();
        assert!(
            names.iter().any(|n| lower.contains(n)),
            "{what}: error {error:?} names none of {names:?}"
        );
        self.wait_listening();
        self.assert_unharmed(what);
        error
    }

    /// Waits until the vmm listens again for a source, on the same address.
    fn wait_listening(&mut self) {
        let uri = self.uri.clone();
        let dst = &self.dst;
        wait_until(secs(20), "the destination to listen again", || {
            let v = dst.query_migrate();
            (dst.status() == "inmigrate" && v["phase"] == "setup").then_some(v)
        });
        assert_eq!(
            self.dst.query_migrate()["listen_uri"].as_str(),
            Some(uri.as_str()),
            "the destination listens elsewhere now"
        );
    }

    /// The VM never ran, guest RAM is as it was, and umemd is alive, serving and within its
    /// memory bound.
    fn assert_unharmed(&mut self, what: &str) {
        assert_eq!(
            self.dst.serial(),
            "",
            "{what}: the destination ran the guest"
        );
        assert_eq!(
            self.dst.ram_file_digest(),
            self.ram0,
            "{what}: guest RAM changed"
        );
        self.assert_umemd_fine(what);
    }

    /// umemd is alive, serves its socket, and has not grown past the bound.
    fn assert_umemd_fine(&mut self, what: &str) {
        self.umemd.proc.assert_alive();
        assert!(
            self.umemd.is_serving(),
            "{what}: umemd stopped accepting connections"
        );
        let (rss, peak) = (self.umemd.rss_kib(), self.umemd.peak_rss_kib());
        assert!(
            rss.max(peak) <= self.rss0_kib + RSS_GROWTH_LIMIT_KIB,
            "{what}: umemd grew from {} KiB to {rss} KiB, peak {peak} KiB (bound: {RSS_GROWTH_LIMIT_KIB} KiB more)",
            self.rss0_kib
        );
    }

    /// Prints umemd's memory at the start, its peak, and now.
    fn report_rss(&self, test: &str) {
        eprintln!(
            "{test}: umemd VmRSS {} KiB at the start, {} KiB now, peak (VmHWM) {} KiB; bound {} KiB growth",
            self.rss0_kib,
            self.umemd.rss_kib(),
            self.umemd.peak_rss_kib(),
            RSS_GROWTH_LIMIT_KIB
        );
    }
}

/// `count` pages from `first` of block `block`.
fn run(block: u32, first: u64, count: u32) -> PageRun {
    PageRun {
        block,
        first,
        count,
    }
}

/// A `Discard` of `ranges` of block `block`.
fn discard(block: u32, ranges: Vec<(u64, u32)>) -> PeerMessage {
    PeerMessage::Discard { block, ranges }
}

/// Runs outside the one-block layout, with the words the refusal must use.
fn out_of_range_runs() -> Vec<(&'static str, PageRun, &'static [&'static str])> {
    vec![
        (
            "block index past the layout",
            run(1, 0, 1),
            &["block index 1 out of range"],
        ),
        (
            "block index u32::MAX",
            run(u32::MAX, 0, 1),
            &["out of range"],
        ),
        (
            "first page past the block",
            run(0, PAGES, 1),
            &["outside block ram-low"],
        ),
        (
            "run past the end of the block",
            run(0, PAGES - 1, 2),
            &["outside block ram-low"],
        ),
        (
            "run wrapping the page numbers",
            run(0, u64::MAX - 1, 4),
            &["wraps"],
        ),
    ]
}

#[test]
fn pages_outside_the_layout_are_refused() {
    if !require_kvm("pages_outside_the_layout_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-pages-out-of-range");
    let mut d = Target::start(&t, false);
    for (what, r, names) in out_of_range_runs() {
        d.attack(&format!("Pages: {what}"), Opening::Complete, names, |p| {
            let _ = p.send_pages(r, 0xa5);
        });
    }
    d.report_rss("pages_outside_the_layout_are_refused");
}

#[test]
fn zero_pages_outside_the_layout_are_refused() {
    if !require_kvm("zero_pages_outside_the_layout_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-zero-pages-out-of-range");
    let mut d = Target::start(&t, false);
    for (what, r, names) in out_of_range_runs() {
        d.attack(
            &format!("ZeroPages: {what}"),
            Opening::Complete,
            names,
            |p| {
                let _ = p.send(&PeerMessage::ZeroPages(r));
            },
        );
    }
    // Holes take the same way, with a 64-bit count.
    for (what, block, first, count, names) in [
        (
            "block index past the layout",
            1,
            0,
            1,
            &["out of range"][..],
        ),
        (
            "a count past the block",
            0,
            0,
            PAGES + 1,
            &["outside block"][..],
        ),
        ("a count of 2^63", 0, 1, 1 << 63, &["outside block"][..]),
    ] {
        d.attack(&format!("Holes: {what}"), Opening::Complete, names, |p| {
            let _ = p.send(&PeerMessage::Holes {
                block,
                first,
                count,
            });
        });
    }
    d.report_rss("zero_pages_outside_the_layout_are_refused");
}

#[test]
fn discards_outside_the_layout_are_refused() {
    if !require_kvm("discards_outside_the_layout_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-discard-out-of-range");
    let mut d = Target::start(&t, false);
    let cases: [(&str, PeerMessage, &[&str]); 6] = [
        (
            "block index past the layout",
            discard(1, vec![(0, 1)]),
            &["block index 1 out of range"],
        ),
        (
            "first page past the block",
            discard(0, vec![(PAGES, 1)]),
            &["outside block ram-low"],
        ),
        (
            "range past the end of the block",
            discard(0, vec![(PAGES - 1, 2)]),
            &["outside block ram-low"],
        ),
        (
            "range wrapping the page numbers",
            discard(0, vec![(u64::MAX - 1, 4)]),
            &["outside block ram-low"],
        ),
        (
            "a good range, then one past the end",
            discard(0, vec![(0, 1), (PAGES, u32::MAX)]),
            &["outside block ram-low"],
        ),
        (
            "an empty range",
            discard(0, vec![(5, 0)]),
            &["discarded an empty range"],
        ),
    ];
    for (what, msg, names) in cases {
        d.attack(&format!("Discard: {what}"), Opening::Complete, names, |p| {
            let _ = p.send(&msg);
        });
    }
    d.report_rss("discards_outside_the_layout_are_refused");
}

#[test]
fn a_discard_of_part_of_a_huge_page_is_refused() {
    let test = "a_discard_of_part_of_a_huge_page_is_refused";
    if !require_kvm(test) || !require_huge_pages(test, MEM_BYTES / (2 << 20) + 8) {
        return;
    }
    let t = TestEnv::new("hostile-huge-discard");
    let mut d = Target::start_on(&t, false, true);
    // A destination on huge pages can only drop whole ones (its hello says so): the page
    // asked for is not dropped with its 511 neighbours, nor zeroed in place.
    for (what, ranges) in [
        ("one page", vec![(1, 1)]),
        (
            "a whole huge page, then a part of one",
            vec![(0, 512), (1024, 100)],
        ),
    ] {
        d.attack(
            &format!("Discard on huge pages: {what}"),
            Opening::Complete,
            &["part of a huge page"],
            |p| {
                p.send_pages(run(0, 0, 2), 0x5a).expect("sending pages");
                let _ = p.send(&discard(0, ranges));
            },
        );
    }
    d.report_rss(test);
}

/// Takes a hostile source through a precopy switchover: two pages of data at `first`, the
/// switchover, the machine state, and the destination's `Ready`. Returns the source and the
/// destination's RAM at that point.
fn up_to_ready(
    d: &Target,
    state: &[u8],
    first: u64,
    postcopy: bool,
) -> (HostileSource, RamFileDigest) {
    let mut p = d.open(Opening::Complete);
    p.send_pages(run(0, first, 2), 0x5a).expect("sending pages");
    p.send(&PeerMessage::Switchover { postcopy })
        .expect("sending Switchover");
    p.send(&PeerMessage::MachineState(state.to_vec()))
        .expect("sending the machine state");
    if let Err(other) = p.wait_ready(reply_timeout()) {
        panic!("expected Ready after a real machine state, got {other:?}");
    }
    let ram = d.dst.ram_file_digest();
    assert_eq!(ram.nonzero_pages, 2, "the two pages sent before the state");
    (p, ram)
}

#[test]
fn a_second_machine_state_is_refused() {
    if !require_kvm("a_second_machine_state_is_refused") {
        return;
    }
    let t = TestEnv::new("hostile-second-state");
    let other = t.umemd("umemd-other");
    let state = capture_machine_state(&t, &other, MEM);
    let mut d = Target::start(&t, false);

    // A state loaded and waiting for the commit, then another.
    let (mut p, _) = up_to_ready(&d, &state, 100, false);
    p.send(&PeerMessage::MachineState(state.clone()))
        .expect("sending the second state");
    let reply = p.next_reply(reply_timeout());
    d.check_refusal("a second machine state", reply, &["second machine state"]);

    // Two states back to back, before the first can have been answered: the first is loaded
    // and answered, the second refused.
    let mut p = d.open(Opening::Complete);
    p.send(&PeerMessage::Switchover { postcopy: false })
        .expect("sending Switchover");
    for _ in 0..2 {
        let _ = p.send(&PeerMessage::MachineState(state.clone()));
    }
    let mut reply = p.next_reply(reply_timeout());
    if matches!(reply, Reply::Message(PeerMessage::Ready)) {
        reply = p.next_reply(reply_timeout());
    }
    d.check_refusal(
        "two machine states back to back",
        reply,
        &["second machine state"],
    );
    // A state with no switchover announced, and a second switchover.
    d.attack(
        "a machine state without a switchover",
        Opening::Complete,
        &["without a switchover"],
        |p| {
            let _ = p.send(&PeerMessage::MachineState(state.clone()));
        },
    );
    d.attack(
        "a second switchover",
        Opening::Complete,
        &["second switchover"],
        |p| {
            let _ = p.send(&PeerMessage::Switchover { postcopy: false });
            let _ = p.send(&PeerMessage::Switchover { postcopy: true });
        },
    );
    d.report_rss("a_second_machine_state_is_refused");
}

#[test]
fn a_drain_is_answered_once_the_pages_before_it_are_in_and_refused_after_the_switchover() {
    if !require_kvm(
        "a_drain_is_answered_once_the_pages_before_it_are_in_and_refused_after_the_switchover",
    ) {
        return;
    }
    let t = TestEnv::new("hostile-drain");
    let other = t.umemd("umemd-other");
    let state = capture_machine_state(&t, &other, MEM);
    let mut d = Target::start(&t, false);

    // Half of RAM in whole runs, more than the destination's sockets and placing queue hold,
    // then the drain: when its answer comes, every one of those pages is in guest RAM.
    let runs = PAGES / 2 / MAX_RUN_PAGES as u64;
    let mut p = d.open(Opening::Complete);
    for i in 0..runs {
        p.send_pages(run(0, i * MAX_RUN_PAGES as u64, MAX_RUN_PAGES), 0x5a)
            .expect("sending pages");
    }
    p.send(&PeerMessage::Drain { round: 7 })
        .expect("sending Drain");
    match p.next_reply(reply_timeout()) {
        Reply::Message(PeerMessage::Drained { round: 7 }) => {}
        other => panic!("expected Drained for round 7, got {other:?}"),
    }
    let ram = d.dst.ram_file_digest();
    assert_eq!(
        ram.nonzero_pages,
        runs * MAX_RUN_PAGES as u64,
        "pages sent before the drain, in guest RAM when it is answered"
    );

    // Once the machine state is loaded there is nothing to drain: the source that asks is
    // refused, and the VM never runs.
    p.send(&PeerMessage::Switchover { postcopy: false })
        .expect("sending Switchover");
    p.send(&PeerMessage::MachineState(state))
        .expect("sending the machine state");
    if let Err(other) = p.wait_ready(reply_timeout()) {
        panic!("expected Ready after a real machine state, got {other:?}");
    }
    let _ = p.send(&PeerMessage::Drain { round: 8 });
    let reply = p.next_reply(reply_timeout());
    d.check_refusal(
        "a drain after the switchover",
        reply,
        &["drain after the switchover"],
    );
    d.report_rss(
        "a_drain_is_answered_once_the_pages_before_it_are_in_and_refused_after_the_switchover",
    );
}

#[test]
fn pages_between_the_machine_state_and_the_commit_are_refused() {
    if !require_kvm("pages_between_the_machine_state_and_the_commit_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-pages-after-state");
    let other = t.umemd("umemd-other");
    let state = capture_machine_state(&t, &other, MEM);
    let mut d = Target::start(&t, false);
    const X: u64 = 100;
    let cases: [(&str, PeerMessage); 5] = [
        ("Pages over a page sent", PeerMessage::Pages(run(0, X, 1))),
        ("Pages of a new page", PeerMessage::Pages(run(0, 300, 1))),
        (
            "ZeroPages over a page sent",
            PeerMessage::ZeroPages(run(0, X, 1)),
        ),
        (
            "Holes over a page sent",
            PeerMessage::Holes {
                block: 0,
                first: X,
                count: 1,
            },
        ),
        (
            "Discard of a page sent",
            PeerMessage::Discard {
                block: 0,
                ranges: vec![(X, 1)],
            },
        ),
    ];
    for (what, msg) in cases {
        let (mut p, loaded) = up_to_ready(&d, &state, X, false);
        let _ = match msg {
            PeerMessage::Pages(r) => p.send_pages(r, 0xa5),
            other => p.send(&other),
        };
        let reply = p.next_reply(secs(5));
        if matches!(reply, Reply::Silent) {
            // Taken in: the loaded state must still wait over RAM as the source left it. (After
            // a refusal RAM is being reset, and no read of it then is a fair one.)
            assert_eq!(
                d.dst.ram_file_digest(),
                loaded,
                "{what}: taken in after Ready, and guest RAM changed under the loaded state"
            );
        }
        drop(p);
        d.check_refusal(what, reply, &["after the machine state"]);
        // Refused before it was applied: the attempt counted the two pages sent before the
        // state and nothing more.
        let stats = &d.last_failure["stats"];
        assert_eq!(
            [
                &stats["pages_sent"],
                &stats["zero_pages"],
                &stats["holes_skipped"]
            ],
            [&json!(2), &json!(0), &json!(0)],
            "{what}: {stats}"
        );
    }
    d.report_rss("pages_between_the_machine_state_and_the_commit_are_refused");
}

/// Sends what a committed precopy source must no longer send; errors are expected, as the
/// destination may have closed already.
fn send_after_commit(p: &mut HostileSource, state: &[u8], x: u64) {
    let _ = p.send_pages(run(0, x, 1), 0xa5);
    let _ = p.send_pages(run(0, 300, 1), 0xa5);
    let _ = p.send(&PeerMessage::ZeroPages(run(0, x + 1, 1)));
    let _ = p.send(&PeerMessage::Discard {
        block: 0,
        ranges: vec![(x, 2)],
    });
    let _ = p.send(&PeerMessage::MachineState(state.to_vec()));
    let _ = p.send(&PeerMessage::Commit);
}

#[test]
fn pages_after_the_commit_do_not_land() {
    if !require_kvm("pages_after_the_commit_do_not_land") {
        return;
    }
    let t = TestEnv::new("hostile-pages-after-commit");
    let other = t.umemd("umemd-other");
    let state = capture_machine_state(&t, &other, MEM);
    // Paused: this VM's state belongs with RAM the hostile source never sent; it must not run.
    let mut d = Target::start(&t, true);
    const X: u64 = 100;

    // Precopy: the migration is over at the commit, and nothing after it is read.
    let (mut p, loaded) = up_to_ready(&d, &state, X, false);
    p.send(&PeerMessage::Commit).expect("sending Commit");
    match p.next_reply(reply_timeout()) {
        Reply::Message(PeerMessage::Started) => {}
        other => panic!("expected Started after the commit, got {other:?}"),
    }
    send_after_commit(&mut p, &state, X);
    let v = d.dst.wait_phase(secs(20), &["completed", "failed"]);
    eprintln!("after a precopy commit: destination reports {v}");
    assert_eq!(v["phase"], "completed", "{v}");
    // The destination has closed the stream: what followed the commit was never read.
    let after = p.next_reply(reply_timeout());
    assert!(matches!(after, Reply::Closed(_)), "{after:?}");
    assert_eq!(
        d.dst.ram_file_digest(),
        loaded,
        "guest RAM changed after the commit"
    );
    assert_eq!(d.dst.status(), "paused");
    assert_eq!(d.dst.serial(), "");
    d.assert_umemd_fine("after a precopy commit");
    d.report_rss("pages_after_the_commit_do_not_land");
}

#[test]
fn pages_after_a_postcopy_commit_never_replace_pages_already_there() {
    if !require_kvm("pages_after_a_postcopy_commit_never_replace_pages_already_there") {
        return;
    }
    let t = TestEnv::new("hostile-pages-after-postcopy-commit");
    let other = t.umemd("umemd-other");
    let state = capture_machine_state(&t, &other, MEM);
    let mut d = Target::start(&t, true);
    const X: u64 = 100;

    // Postcopy: pages still come after the commit, but a page already there stays as it is.
    let (mut p, loaded) = up_to_ready(&d, &state, X, true);
    p.send(&PeerMessage::Commit).expect("sending Commit");
    match p.next_reply(reply_timeout()) {
        Reply::Message(PeerMessage::Started) => {}
        other => panic!("expected Started after the commit, got {other:?}"),
    }
    p.send_pages(run(0, X, 2), 0xa5).expect("Pages over X");
    p.send(&PeerMessage::ZeroPages(run(0, X, 2)))
        .expect("ZeroPages over X");
    p.send(&PeerMessage::Holes {
        block: 0,
        first: X,
        count: 2,
    })
    .expect("Holes over X");
    // The rest of RAM, as zero pages: then every page is here and the migration completes.
    for first in (0..PAGES).step_by(MAX_RUN_PAGES as usize) {
        p.send(&PeerMessage::ZeroPages(run(0, first, MAX_RUN_PAGES)))
            .expect("zero pages");
    }
    match p.next_reply(reply_timeout()) {
        Reply::Message(PeerMessage::AllReceived) => {}
        other => panic!("expected AllReceived, got {other:?}"),
    }
    let v = d.dst.wait_phase(secs(20), &["completed", "failed"]);
    eprintln!("after a postcopy commit: destination reports {v}");
    assert_eq!(v["phase"], "completed", "{v}");
    send_after_commit(&mut p, &state, X);
    let after = p.next_reply(reply_timeout());
    assert!(matches!(after, Reply::Closed(_)), "{after:?}");
    assert_eq!(
        d.dst.ram_file_digest(),
        loaded,
        "a page already there was replaced after the commit"
    );
    assert_eq!(d.dst.status(), "paused");
    d.assert_umemd_fine("after a postcopy commit");
    d.report_rss("pages_after_a_postcopy_commit_never_replace_pages_already_there");
}

/// A frame prefix announcing `len` bytes of `kind`.
fn prefix(len: u32, kind: u8) -> Vec<u8> {
    let mut b = len.to_le_bytes().to_vec();
    b.push(kind);
    b
}

#[test]
fn frames_at_and_beyond_the_limits_are_refused() {
    if !require_kvm("frames_at_and_beyond_the_limits_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-limits");
    let mut d = Target::start(&t, false);

    // One byte over the frame limit: refused from the prefix, before the body is read.
    for upto in [Opening::Connected, Opening::Complete] {
        d.attack(
            &format!("a frame of MAX_FRAME+1 bytes after {upto:?}"),
            upto,
            &["exceeds the 8388608 byte limit"],
            |p| {
                let _ = p.send_raw(&prefix(MAX_FRAME + 1, kind::HEARTBEAT));
                let _ = p.send_raw(&[0; 4096]);
            },
        );
    }
    // A machine state filling a frame of the limit: umemd hands it on, the vmm refuses it.
    d.attack(
        "a machine state of MAX_FRAME bytes",
        Opening::Complete,
        &["machine state"],
        |p| {
            let _ = p.send(&PeerMessage::Switchover { postcopy: false });
            let _ = p.send(&PeerMessage::MachineState(vec![0; MAX_FRAME as usize - 4]));
        },
    );
    // Exactly at the frame limit, before authenticating: refused from its prefix (nothing
    // that large comes before admission) without reading it. Nine times, so that memory kept
    // per connection would pass the RSS bound.
    let body = vec![0u8; MAX_FRAME as usize];
    for i in 0..9 {
        d.attack(
            &format!("a frame of MAX_FRAME bytes before the Hello ({i})"),
            Opening::Connected,
            &["not a umem peer", "at most 256"],
            |p| {
                let _ = p.send_frame(kind::HELLO, &body);
            },
        );
    }
    // Run counts of 0 and MAX_RUN_PAGES+1, as Pages and ZeroPages.
    for count in [0, MAX_RUN_PAGES + 1] {
        d.attack(
            &format!("Pages of {count} pages"),
            Opening::Complete,
            &["run page count"],
            |p| {
                let _ = p.send_pages(run(0, 0, count), 0xa5);
            },
        );
        d.attack(
            &format!("ZeroPages of {count} pages"),
            Opening::Complete,
            &["run page count"],
            |p| {
                let _ = p.send(&PeerMessage::ZeroPages(run(0, 0, count)));
            },
        );
    }
    // A Discard of one range more than allowed, each range inside the block.
    d.attack(
        "a Discard of MAX_DISCARD_RANGES+1 ranges",
        Opening::Complete,
        &["discard ranges"],
        |p| {
            let ranges = (0..=MAX_DISCARD_RANGES as u64)
                .map(|i| (i % PAGES, 1))
                .collect();
            let _ = p.send(&PeerMessage::Discard { block: 0, ranges });
        },
    );
    // An error text over the limit is malformed; one at the limit is the source's reason,
    // passed on whole and no longer.
    let long = "x".repeat(MAX_ERROR_LEN + 1);
    d.attack(
        "an error text of MAX_ERROR_LEN+1 bytes",
        Opening::Complete,
        &["error text"],
        |p| {
            let mut body = (long.len() as u16).to_le_bytes().to_vec();
            body.extend_from_slice(long.as_bytes());
            let _ = p.send_frame(kind::ERROR, &body);
        },
    );
    let e = d.attack(
        "an error text of MAX_ERROR_LEN bytes",
        Opening::Complete,
        &["source failed"],
        |p| {
            let _ = p.send(&PeerMessage::Error(long[..MAX_ERROR_LEN].to_string()));
        },
    );
    assert!(
        e.len() < MAX_ERROR_LEN + 256,
        "the reported error grew to {} bytes",
        e.len()
    );
    d.report_rss("frames_at_and_beyond_the_limits_are_refused");
}

#[test]
fn a_slow_loris_opening_is_cut_at_the_handshake_deadline() {
    if !require_kvm("a_slow_loris_opening_is_cut_at_the_handshake_deadline") {
        return;
    }
    // `a_trickled_handshake_is_dropped_and_the_destination_keeps_listening`
    // (tests/link_failures.rs) trickles the AuthHello; this one trickles the AuthHello, the
    // Hello and the layout, each byte well within any per-read timeout: the admission
    // deadline covers the authentication and the first message together, not each frame.
    let t = TestEnv::new("hostile-slow-loris");
    let mut d = Target::start(&t, false);
    let mut opening = Vec::new();
    PeerMessage::AuthHello {
        method: proto::auth::AuthMethod::None,
        nonce: [1; proto::auth::NONCE_LEN],
    }
    .encode(&mut opening);
    PeerMessage::Hello {
        version: proto::peer::VERSION,
        capabilities: proto::peer::CAP_POSTCOPY,
        session_id: umem_testkit::hostile::SESSION_ID,
        link_timeout_ms: umem_testkit::hostile::LINK_TIMEOUT_MS,
    }
    .encode(&mut opening);
    PeerMessage::Layout {
        blocks: low_ram_layout(MEM_BYTES),
    }
    .encode(&mut opening);
    let every = Duration::from_millis(300);
    assert!(
        every * opening.len() as u32 > HANDSHAKE_DEADLINE + Duration::from_secs(5),
        "the trickle must outlast the deadline"
    );
    let mut p = d.open(Opening::Connected);
    let t0 = Instant::now();
    let mut sent = 0;
    for b in &opening {
        if p.send_raw(&[*b]).is_err() || !dropped_lines(&d.umemd).is_empty() {
            break;
        }
        sent += 1;
        std::thread::sleep(every);
    }
    let error = d.assert_destination_still_usable("a slow-loris opening", &["timed out"]);
    let took = t0.elapsed();
    eprintln!(
        "the slow opening was cut after {took:?}, {sent} of {} bytes",
        opening.len()
    );
    assert!(
        error.contains("turned away") || error.contains("dropped a connection"),
        "a trickling peer is dropped at the door, not admitted: {error}"
    );
    assert!(
        took < HANDSHAKE_DEADLINE + secs(3),
        "the destination waited {took:?} for a trickled opening"
    );
    drop(p);
    d.report_rss("a_slow_loris_opening_is_cut_at_the_handshake_deadline");
}

/// `n` pseudo-random bytes from `seed` (xorshift64*).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn garbage_before_the_handshake_is_refused() {
    if !require_kvm("garbage_before_the_handshake_is_refused") {
        return;
    }
    let t = TestEnv::new("hostile-garbage");
    let mut d = Target::start(&t, false);
    // What reaches an open port: noise, and other protocols' first words. Each is followed by
    // the end of the stream, so that a short length cannot leave the destination waiting.
    let garbage: Vec<(String, Vec<u8>)> = (1..=3u64)
        .map(|seed| (format!("4 KiB of noise (seed {seed})"), noise(seed, 4096)))
        .chain([
            (
                "an HTTP request".to_string(),
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
            ),
            (
                "an SSH banner".to_string(),
                b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
            ),
            (
                "a TLS ClientHello".to_string(),
                [
                    &[
                        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                    ][..],
                    &noise(9, 64),
                ]
                .concat(),
            ),
            (
                "a short frame of an unknown kind".to_string(),
                vec![1, 0, 0, 0, 0xee, 0],
            ),
        ])
        .collect();
    for (what, bytes) in garbage {
        // A TLS ClientHello is recognised as such: this destination has no TLS credentials.
        d.attack(&what, Opening::Connected, &["authhello", "uses tls"], |p| {
            let _ = p.send_raw(&bytes);
            let _ = p.shutdown_write();
        });
    }
    // A port scan: connect and close, a few times over.
    for i in 0..3 {
        let p = d.open(Opening::Connected);
        drop(p);
        d.assert_destination_still_usable(
            &format!("a port scan's connection ({i})"),
            &["connection closed", "closed the connection"],
        );
    }
    d.report_rss("garbage_before_the_handshake_is_refused");
}

#[test]
fn pages_before_the_hello_are_refused() {
    if !require_kvm("pages_before_the_hello_are_refused") {
        return;
    }
    let t = TestEnv::new("hostile-pages-before-hello");
    let mut d = Target::start(&t, false);
    let frames: [(&str, PeerMessage); 4] = [
        ("Pages", PeerMessage::Pages(run(0, 0, 4))),
        ("ZeroPages", PeerMessage::ZeroPages(run(0, 0, 4))),
        (
            "Discard",
            PeerMessage::Discard {
                block: 0,
                ranges: vec![(0, 4)],
            },
        ),
        ("Commit", PeerMessage::Commit),
    ];
    // Before authenticating, then authenticated but before the Hello: each turned away at
    // the door, the session untouched.
    for (upto, before, names) in [
        (
            Opening::Connected,
            "authenticating",
            ["expected authhello", "at most 256"],
        ),
        (
            Opening::Authenticated,
            "the Hello",
            ["expected hello", "at most 256"],
        ),
    ] {
        for (what, msg) in frames.clone() {
            d.attack(&format!("{what} before {before}"), upto, &names, |p| {
                let _ = match msg {
                    PeerMessage::Pages(r) => p.send_pages(r, 0xa5),
                    other => p.send(&other),
                };
            });
        }
    }
    // Past the Hello, before the layout was accepted: the same, where the layout belongs.
    d.attack(
        "Pages before the layout",
        Opening::Hello,
        &["expected the ram layout"],
        |p| {
            let _ = p.send_pages(run(0, 0, 4), 0xa5);
        },
    );
    d.report_rss("pages_before_the_hello_are_refused");
}

/// A real migration of another VM pair: its source on `src_umemd`, its destination on the
/// attacked umemd. It completes with the same RAM on both sides and the guest runs on.
fn migrate_another_vm(t: &TestEnv, src_umemd: &Umemd, dst_umemd: &Umemd) -> Value {
    let setup = MigrationSetup::memtouch(t, "256M", MEMTOUCH_CMDLINE).paused_destination();
    let mut src = setup.source(src_umemd);
    let mut dst = setup.destination("dst2", dst_umemd);
    src.wait_pass(secs(60), 2);
    let o = src.migrate_to(&mut dst, json!({}), secs(60));
    assert_completed("the unrelated migration", &o);
    assert_same_ram(&src, &dst);
    dst.resume();
    assert_guest_runs_on(&src, &mut dst, 2, secs(30));
    o.raw
}

#[test]
fn the_destination_umemd_migrates_another_vm_after_hostile_sources() {
    if !require_kvm("the_destination_umemd_migrates_another_vm_after_hostile_sources") {
        return;
    }
    let t = TestEnv::new("hostile-then-real");
    let src_umemd = t.umemd("umemd-src");
    let mut d = Target::start(&t, false);
    // One of each kind, on the one destination: garbage, a scan, a run out of range, frames at
    // and over the limit, pages before the Hello.
    d.attack("noise", Opening::Connected, &["authhello"], |p| {
        let _ = p.send_raw(&noise(42, 4096));
        let _ = p.shutdown_write();
    });
    drop(d.open(Opening::Connected));
    d.assert_destination_still_usable(
        "a port scan's connection",
        &["connection closed", "closed the connection"],
    );
    d.attack(
        "Pages past the layout",
        Opening::Complete,
        &["out of range"],
        |p| {
            let _ = p.send_pages(run(7, 0, 1), 0xa5);
        },
    );
    d.attack(
        "a frame of MAX_FRAME bytes before the Hello",
        Opening::Connected,
        &["not a umem peer", "at most 256"],
        |p| {
            let _ = p.send_frame(kind::HELLO, &vec![0; MAX_FRAME as usize]);
        },
    );
    d.attack(
        "a frame of MAX_FRAME+1 bytes",
        Opening::Complete,
        &["exceeds"],
        |p| {
            let _ = p.send_raw(&prefix(MAX_FRAME + 1, kind::PAGES));
        },
    );
    d.attack(
        "Pages before authenticating",
        Opening::Connected,
        &["expected authhello", "at most 256"],
        |p| {
            let _ = p.send_pages(run(0, 0, 1), 0xa5);
        },
    );

    let raw = migrate_another_vm(&t, &src_umemd, &d.umemd);
    eprintln!("the unrelated migration: {}", raw["stats"]);
    // The attacked destination still waits, untouched, for its own source.
    d.wait_listening();
    d.assert_unharmed("after the unrelated migration");
    d.report_rss("the_destination_umemd_migrates_another_vm_after_hostile_sources");
}
