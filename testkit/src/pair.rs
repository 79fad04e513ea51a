//! The two sides of a migration, as the end-to-end tests set them up: a umemd for each host, a
//! source vmm running a built-in guest and a destination vmm waiting with `--incoming`, and the
//! checks every migration test makes on them afterwards.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{
    assert_consecutive, assert_no_bad, parse_passes, secs, wait_until, MigrationOutcome, Pass,
    TestEnv, Umemd, Vmm,
};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// memtouch with a short pause between passes: a few passes per second here.
pub const MEMTOUCH_CMDLINE: &str = "pages=4096 pause=1000";

/// The working set of [`MEMTOUCH_CMDLINE`], in pages.
pub const MEMTOUCH_PAGES: u64 = 4096;

/// Where memtouch's working set begins (its default `base`).
pub const MEMTOUCH_BASE: u64 = 0x100_0000;

/// The digest guest's rounds in [`DIGEST_CMDLINE`].
pub const DIGEST_ROUNDS: u32 = 32;

/// The digest guest with enough rounds that a migration surely ends before the guest does
/// (~8 s emulated).
pub const DIGEST_CMDLINE: &str = "pages=256 rounds=32";

/// Guest ranges a running memtouch guest may still write: its image, bss and stack (first
/// 2 MiB) and its working set of `pages` pages. Everything else keeps the source's bytes.
pub fn memtouch_exclude(pages: u64) -> Vec<(u64, u64)> {
    vec![(0, 2 << 20), (MEMTOUCH_BASE, pages * PAGE_SIZE)]
}

/// A vmm `name` of `mem` running memtouch ([`MEMTOUCH_CMDLINE`]) on prefilled RAM, once its
/// first pass is done: a source whose pages all differ from a fresh destination's.
pub fn memtouch_source(env: &TestEnv, umemd: &Umemd, name: &str, mem: &str) -> Vmm {
    let mut src = env
        .vmm(name, umemd)
        .mem(mem)
        .guest("memtouch")
        .cmdline(MEMTOUCH_CMDLINE)
        .prefill(1)
        .start();
    src.wait_pass(secs(60), 1);
    src
}

/// The machine both sides of a migration have, and the guest the source runs.
pub struct MigrationSetup<'a> {
    env: &'a TestEnv,
    mem: String,
    destination_mem: Option<String>,
    vcpus: u32,
    guest: String,
    cmdline: String,
    prefilled: bool,
    paused_destination: bool,
    /// Guest RAM on 2 MiB huge pages (`--hugepages`): source, destination.
    hugepages: (bool, bool),
    /// Arguments given to both umemds.
    umemd_args: Vec<String>,
}

impl<'a> MigrationSetup<'a> {
    /// `mem` of RAM and one vCPU on each side; the source runs the built-in `guest` with
    /// `cmdline`; the destination starts running as soon as the migration ends.
    pub fn new(env: &'a TestEnv, mem: &str, guest: &str, cmdline: &str) -> Self {
        MigrationSetup {
            env,
            mem: mem.into(),
            destination_mem: None,
            vcpus: 1,
            guest: guest.into(),
            cmdline: cmdline.into(),
            prefilled: false,
            paused_destination: false,
            hugepages: (false, false),
            umemd_args: Vec::new(),
        }
    }

    /// A source running memtouch with `cmdline`.
    pub fn memtouch(env: &'a TestEnv, mem: &str, cmdline: &str) -> Self {
        Self::new(env, mem, "memtouch", cmdline)
    }

    /// Both umemds get `arg` on their command line.
    pub fn umemd_arg(mut self, arg: &str) -> Self {
        self.umemd_args.push(arg.into());
        self
    }

    /// `n` vCPUs on each side.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// The source's RAM is populated before the guest starts (`--prefill 1`).
    pub fn prefilled(mut self) -> Self {
        self.prefilled = true;
        self
    }

    /// Guest RAM on 2 MiB huge pages (`--hugepages`) on the source, on the destination.
    pub fn hugepages(mut self, source: bool, destination: bool) -> Self {
        self.hugepages = (source, destination);
        self
    }

    /// The destination waits with `-S` after the migration, until `cont`.
    pub fn paused_destination(mut self) -> Self {
        self.paused_destination = true;
        self
    }

    /// The destination has `mem` of RAM instead of the source's (a layout mismatch).
    pub fn destination_mem(mut self, mem: &str) -> Self {
        self.destination_mem = Some(mem.into());
        self
    }

    /// Starts the umemds `umemd-src` and `umemd-dst`.
    pub fn start_umemds(&self) -> (Umemd, Umemd) {
        let start = |name| {
            let b = self.env.umemd_builder(name);
            self.umemd_args.iter().fold(b, |b, a| b.arg(a)).start()
        };
        (start("umemd-src"), start("umemd-dst"))
    }

    /// Starts a vmm named `name` that runs the guest.
    pub fn guest_vm(&self, name: &str, umemd: &Umemd) -> Vmm {
        let vm = self
            .env
            .vmm(name, umemd)
            .mem(&self.mem)
            .vcpus(self.vcpus)
            .guest(&self.guest)
            .cmdline(&self.cmdline)
            .hugepages(self.hugepages.0);
        if self.prefilled { vm.prefill(1) } else { vm }.start()
    }

    /// Starts the source vmm, `src`.
    pub fn source(&self, umemd: &Umemd) -> Vmm {
        self.guest_vm("src", umemd)
    }

    /// Starts a destination vmm named `name`, listening for an incoming migration.
    pub fn destination(&self, name: &str, umemd: &Umemd) -> Vmm {
        self.env
            .vmm(name, umemd)
            .mem(self.destination_mem.as_deref().unwrap_or(&self.mem))
            .vcpus(self.vcpus)
            .incoming_any()
            .paused(self.paused_destination)
            .hugepages(self.hugepages.1)
            .start()
    }

    /// Starts both umemds, the source `src` and the destination `dst`.
    pub fn start(&self) -> Pair {
        let (src_umemd, dst_umemd) = self.start_umemds();
        let src = self.source(&src_umemd);
        let dst = self.destination("dst", &dst_umemd);
        Pair {
            src,
            dst,
            src_umemd,
            dst_umemd,
        }
    }
}

/// Neither umemd of `pair` kept the guest RAM it moved resident: each one's peak RSS is at
/// most 1% of `moved` bytes plus a fixed 48 MiB (the source's window of pages read, its
/// batches, the destination's buffers).
pub fn assert_umemds_rss_bounded(pair: &Pair, moved: u64) {
    for (side, u) in [
        ("source", &pair.src_umemd),
        ("destination", &pair.dst_umemd),
    ] {
        let peak_kib = u.peak_rss_kib();
        assert!(
            peak_kib > 0 && peak_kib <= (moved >> 10) / 100 + (48 << 10),
            "the {side} umemd's peak RSS is {peak_kib} KiB for {} MiB moved",
            moved >> 20
        );
    }
}

/// The processes of one migration (the vmms are killed before the umemds when it is dropped).
pub struct Pair {
    /// The source vmm, running the guest.
    pub src: Vmm,
    /// The destination vmm, waiting for the guest.
    pub dst: Vmm,
    /// The source's umemd.
    pub src_umemd: Umemd,
    /// The destination's umemd.
    pub dst_umemd: Umemd,
}

impl Pair {
    /// Starts the migration from `src` to `dst` with `params`; see [`Vmm::start_migration_to`].
    pub fn start_migration(&mut self, params: Value) {
        self.src.start_migration_to(&mut self.dst, params);
    }

    /// Migrates from `src` to `dst` with `params`; see [`Vmm::migrate_to`].
    pub fn migrate_and_wait(&mut self, params: Value, timeout: Duration) -> MigrationOutcome {
        self.src.migrate_to(&mut self.dst, params, timeout)
    }

    /// Whether both umemds still run and accept connections.
    pub fn umemds_serving(&mut self) -> bool {
        self.src_umemd.is_serving() && self.dst_umemd.is_serving()
    }
}

impl Vmm {
    /// Source: starts a migration with `params` to `dst`, once it listens.
    pub fn start_migration_to(&mut self, dst: &mut Vmm, params: Value) {
        let uri = dst.listen_uri();
        self.migrate(&uri, params)
            .unwrap_or_else(|e| panic!("{}: migrate command refused: {e}", self.name));
    }

    /// Source: migrates with `params` to `dst` and waits (up to `timeout`) for the end.
    pub fn migrate_to(
        &mut self,
        dst: &mut Vmm,
        params: Value,
        timeout: Duration,
    ) -> MigrationOutcome {
        self.start_migration_to(dst, params);
        self.wait_migration(timeout)
    }

    /// The number of the last memtouch pass so far; panics when there is none.
    pub fn last_pass_number(&self) -> u64 {
        self.last_pass()
            .unwrap_or_else(|| panic!("{} printed no memtouch pass", self.name))
            .pass
    }

    /// `cont`: lets a `-S` destination run.
    pub fn resume(&self) {
        self.ctl("cont", json!({}))
            .unwrap_or_else(|e| panic!("{}: cont: {e}", self.name));
    }
}

/// The source's serial output followed by the destination's: the guest's whole output stream,
/// since the serial port moves with the machine state at switchover.
pub fn combined_passes(src: &Vmm, dst: &Vmm) -> Vec<Pass> {
    parse_passes(&(src.serial() + &dst.serial()))
}

/// Asserts that a migration completed without an error.
pub fn assert_completed(who: &str, o: &MigrationOutcome) {
    assert_eq!(
        o.phase, "completed",
        "{who}: migration did not complete: {}",
        o.raw
    );
    assert!(
        o.error.is_none(),
        "{who}: completed with an error: {}",
        o.raw
    );
}

/// Asserts that a migration failed with an error naming one of `any_of` (lower case), and
/// returns the error.
pub fn assert_failed_with(who: &str, o: &MigrationOutcome, any_of: &[&str]) -> String {
    assert_eq!(
        o.phase, "failed",
        "{who}: expected a failed migration: {}",
        o.raw
    );
    let e = o
        .error
        .clone()
        .unwrap_or_else(|| panic!("{who}: failed without an error: {}", o.raw));
    let lower = e.to_lowercase();
    assert!(
        any_of.iter().any(|w| lower.contains(w)),
        "{who}: error {e:?} names none of {any_of:?}"
    );
    e
}

/// The guest keeps running on `vm`: status running, three more passes within a minute, none
/// bad, consecutive (a source whose migration failed or was cancelled, say).
pub fn assert_keeps_running(who: &str, vm: &mut Vmm) {
    assert_eq!(vm.status(), "running", "{who} status");
    let last = vm.last_pass().map_or(0, |p| p.pass);
    vm.wait_pass(secs(60), last + 3);
    let passes = vm.passes();
    assert_no_bad(who, &passes);
    assert_consecutive(who, &passes);
}

/// After a migration: waits until the destination prints the pass `more` after the source's
/// last one, then asserts that the guest's whole output has consecutive passes without a bad
/// page. The source may be gone by then (its serial output stays).
pub fn assert_guest_runs_on(src: &Vmm, dst: &mut Vmm, more: u64, timeout: Duration) {
    let src_last = src.last_pass_number();
    dst.wait_pass(timeout, src_last + more);
    let all = combined_passes(src, dst);
    assert_consecutive("source+destination", &all);
    assert_no_bad("source+destination", &all);
}

/// After the migration: the (running) destination runs the guest on from where the source
/// stopped it, `more` passes within `timeout`, without a bad page and without a gap or a repeat
/// in the pass numbers, while the source stays stopped.
pub fn assert_guest_continues(src: &Vmm, dst: &mut Vmm, more: u64, timeout: Duration) {
    let src_last = src.last_pass_number();
    assert_eq!(dst.status(), "running", "destination status");
    assert_guest_runs_on(src, dst, more, timeout);
    let dst_passes = dst.passes();
    assert!(
        !dst_passes.is_empty(),
        "destination printed no complete pass line"
    );
    assert!(
        dst_passes[0].pass > src_last && dst_passes[0].pass <= src_last + 2,
        "destination restarted instead of continuing: source ended at pass {src_last}, destination began at {:?}",
        dst_passes[0]
    );
    assert_eq!(combined_passes(src, dst)[0].pass, 1);
    // The source really is stopped.
    assert_eq!(src.last_pass().map(|p| p.pass), Some(src_last));
    assert_eq!(src.status(), "postmigrate");
}

/// Migrates `src` to `dst`, listening at `uri`, with `args`; asserts both sides complete and
/// the guest runs on at the destination.
pub fn migrate_and_run_on(src: &mut Vmm, dst: &mut Vmm, uri: &str, args: Value) {
    src.migrate(uri, args).expect("migrate");
    assert_completed("source", &src.wait_migration(secs(120)));
    dst.wait_phase(secs(60), &["completed"]);
    assert_guest_runs_on(src, dst, 2, secs(60));
}

/// Asserts that all of guest RAM is the same on both sides; returns the source's digest.
pub fn assert_same_ram(src: &Vmm, dst: &Vmm) -> Vec<(String, String)> {
    let digest = src.digest();
    assert_eq!(
        digest,
        dst.digest(),
        "RAM differs between source and destination"
    );
    digest
}

/// Asserts that guest RAM is the same on both sides outside what a memtouch guest of `pages`
/// pages may still write (see [`memtouch_exclude`]); returns the source's digest.
pub fn assert_same_ram_outside_working_set(
    src: &Vmm,
    dst: &Vmm,
    pages: u64,
) -> Vec<(String, String)> {
    let exclude = memtouch_exclude(pages);
    let digest = src.digest_excluding(&exclude);
    assert_eq!(
        digest,
        dst.digest_excluding(&exclude),
        "RAM differs between source and destination"
    );
    digest
}

/// What a destination does once an incoming migration failed before the VM ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Its umemd is alive: it listens again, RAM reset (status `inmigrate`).
    ListensAgain,
    /// Its umemd is gone: it stays `migrate-failed`.
    StaysFailed,
}

/// Asserts that the destination's incoming migration fails within `timeout`, that it never
/// ran the guest, and that it then does what `after` says; returns its `query-migrate`.
pub fn assert_destination_failed_without_running(
    dst: &mut Vmm,
    timeout: Duration,
    after: AfterFailure,
) -> Value {
    let v = dst.wait_incoming_failures(timeout, 1);
    assert_eq!(dst.serial(), "", "the failed destination printed something");
    let name = dst.name.clone();
    let want = match after {
        AfterFailure::ListensAgain => "inmigrate",
        AfterFailure::StaysFailed => "migrate-failed",
    };
    wait_until(secs(30), &format!("{name}: status {want}"), || {
        (dst.status() == want).then_some(())
    });
    if after == AfterFailure::ListensAgain {
        dst.wait_phase(secs(30), &["setup"]);
    }
    v
}

/// Asserts that the migrated digest guest computes the same digest as the `reference` run that
/// stayed where it started.
pub fn assert_digest_matches_reference(reference: &mut Vmm, dst: &mut Vmm) {
    let expected = reference.wait_serial_prefix(secs(180), "digest=");
    let got = dst.wait_serial_prefix(secs(180), "digest=");
    assert_eq!(got, expected, "migrated run computed a different digest");
}

/// Asserts that the digest guest migrated mid-run: it had not finished on the source.
pub fn assert_digest_guest_moved_mid_run(src: &Vmm) {
    assert!(
        !src.serial().contains("digest="),
        "the guest finished on the source before switchover; the test did not migrate mid-run"
    );
}

/// Asserts that the digest guest's output stream, split across both hosts, has every round of
/// [`DIGEST_ROUNDS`] exactly once.
pub fn assert_every_round_once(src: &Vmm, dst: &Vmm) {
    let all = src.serial() + &dst.serial();
    for r in 1..=DIGEST_ROUNDS {
        let n = all.lines().filter(|l| *l == format!("round={r}")).count();
        assert_eq!(
            n, 1,
            "round={r} appears {n} times in the combined output:\n{all}"
        );
    }
}

/// Asserts that both umemds of `pair` hold a request for idle CPUs that wake at once (the
/// default of `--cpu-wake-latency-us`), and that the host then has it, or that neither does.
pub fn assert_wake_latency_request(pair: &Pair, held: bool) {
    let qos = std::path::Path::new(umemd::wake::CPU_LATENCY_QOS);
    if !qos.exists() {
        eprintln!(
            "skipped the wake-up latency check: {} is missing",
            qos.display()
        );
        return;
    }
    for (who, u) in [
        ("source", &pair.src_umemd),
        ("destination", &pair.dst_umemd),
    ] {
        assert_eq!(
            u.has_open(qos),
            held,
            "{who} umemd holding {}",
            qos.display()
        );
    }
    if held {
        assert_eq!(umemd::wake::current(qos).unwrap(), 0);
    }
}
