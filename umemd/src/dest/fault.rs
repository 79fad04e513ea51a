//! The destination's userfaultfd: reads the VMM's page faults, turns each missing page into one
//! request, and places arriving pages into the VMM's address space with `UFFDIO_COPY`, one ioctl
//! per contiguous run (about 8x cheaper per page than one page at a time).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proto::local::LocalBlock;
use proto::peer::{PageRun, MAX_RUN_PAGES};
use proto::types::LATENCY_BUCKETS;
use proto::{PostcopyStats, PAGE_SIZE};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::huge::{Assembled, AssemblyError, HugePageAssembly};
use super::pages::{PageState, PageTable};

/// Most latency samples kept for percentiles (a sample is 4 bytes); beyond it, a uniform
/// sample of all faults is kept (reservoir sampling).
const MAX_SAMPLES: usize = 1 << 18;
/// How long `serve` waits for a fault before it looks at its stop flag again.
const POLL_MS: u16 = 50;
/// Most pages placed by one `UFFDIO_COPY` of 4 KiB pages (64 KiB). This kernel preempts no
/// thread inside a system call: a copy of a 256 KiB background run into memory the host
/// backs lazily held a core for long enough to show in the fault p99 of the thread waiting
/// for it (4 GiB random touch, p99 757 -> 390 us over 6 runs alternating).
const PLACE_PAGES: u64 = 16;
/// Retries of an `UFFDIO_COPY` that the kernel answered with `EAGAIN` (the VMM's mappings were
/// changing) before giving up.
const MAX_EAGAIN: u32 = 10_000;

/// Errors of fault handling.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Placing a page failed for a reason other than its already being there.
    #[error("placing {len} bytes at {addr:#x} in the VMM: {err}")]
    Place {
        /// Destination address in the VMM.
        addr: u64,
        /// Bytes being placed.
        len: usize,
        /// Why.
        err: String,
    },
    /// Reading the userfaultfd failed.
    #[error("reading page faults: {0}")]
    Read(String),
    /// A page request could not be sent.
    #[error("sending a page request: {0}")]
    Request(#[source] std::io::Error),
    /// Huge pages could not be assembled.
    #[error(transparent)]
    Assembly(#[from] AssemblyError),
}

/// Fault-service latencies and blocked time, updated as pages resolve faults.
#[derive(Debug, Default)]
struct Latency {
    hist: [u64; LATENCY_BUCKETS],
    /// Sum of the latencies in `hist`, microseconds.
    sum_us: u64,
    samples: Vec<u32>,
    recorded: u64,
    max_us: u64,
    /// Per vCPU: blocked time so far and, while blocked, since when.
    vcpu_blocked: Vec<(Duration, Option<Instant>)>,
    blocked_vcpus: usize,
    all_blocked_since: Option<Instant>,
    vm_blocked: Duration,
}

impl Latency {
    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u64;
        let bucket = (64 - us.leading_zeros() as usize)
            .saturating_sub(1)
            .min(LATENCY_BUCKETS - 1);
        self.hist[bucket] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
        self.recorded += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(us as u32);
        } else {
            // Keep sample i with probability MAX_SAMPLES / i (a cheap deterministic hash of i
            // stands in for a random number).
            let r = (self.recorded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) % self.recorded;
            if let Some(slot) = self.samples.get_mut(r as usize) {
                *slot = us as u32;
            }
        }
    }

    fn block(&mut self, vcpu: usize, at: Instant) {
        let n = self.vcpu_blocked.len();
        if let Some(v) = self.vcpu_blocked.get_mut(vcpu) {
            if v.1.is_none() {
                v.1 = Some(at);
                self.blocked_vcpus += 1;
                if self.blocked_vcpus == n {
                    self.all_blocked_since = Some(at);
                }
            }
        }
    }

    fn unblock(&mut self, vcpu: usize, at: Instant) {
        if let Some(v) = self.vcpu_blocked.get_mut(vcpu) {
            if let Some(since) = v.1.take() {
                v.0 += at.saturating_duration_since(since);
                if let Some(all) = self.all_blocked_since.take() {
                    self.vm_blocked += at.saturating_duration_since(all);
                }
                self.blocked_vcpus -= 1;
            }
        }
    }

    /// The `p` quantile of `samples` (reordered in the process), nearest rank.
    fn percentile(samples: &mut [u32], p: f64) -> u64 {
        if samples.is_empty() {
            return 0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        *samples.select_nth_unstable(i).1 as u64
    }
}

/// Where the time of a requested page goes, one sample per page (microseconds): from its
/// fault read to its request written, from there to the page read off the urgent channel
/// (the network and the source), and from there to the page placed and its fault woken.
#[derive(Debug, Default)]
struct Stages {
    /// When each page in flight was requested.
    sent: HashMap<u64, Instant>,
    request: Vec<u32>,
    fetch: Vec<u32>,
    place: Vec<u32>,
}

impl Stages {
    fn push(samples: &mut Vec<u32>, d: Duration) {
        // The first samples only: a bound on memory, not a uniform sample like `Latency`.
        if samples.len() < MAX_SAMPLES {
            samples.push(d.as_micros().min(u32::MAX as u128) as u32);
        }
    }

    /// `[p50, p99]` of `samples` (reordered in the process).
    fn quantiles(samples: &mut [u32]) -> [u64; 2] {
        [
            Latency::percentile(samples, 0.50),
            Latency::percentile(samples, 0.99),
        ]
    }
}

/// A fault waiting for its page: which vCPU (if it is one) and since when.
type Waiter = (Option<usize>, Instant);

/// Handles one VM's faults: the userfaultfd the VMM registered its RAM with, and the table of
/// page states shared with the page receivers.
pub struct FaultHandler {
    uffd: Uffd,
    blocks: Vec<LocalBlock>,
    pages: Arc<PageTable>,
    /// Host thread id to vCPU index.
    vcpus: Mutex<HashMap<u32, usize>>,
    waiters: Mutex<HashMap<u64, Vec<Waiter>>>,
    latency: Mutex<Latency>,
    stages: Mutex<Stages>,
    zeros: Vec<u8>,
    /// Guest RAM on huge pages: each is assembled whole before it is placed.
    huge: Option<HugePageAssembly>,
    faults: AtomicU64,
    requested: AtomicU64,
    stop: AtomicBool,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("faults", &self.faults)
            .finish()
    }
}

fn key(block: u32, page: u64) -> u64 {
    (block as u64) << 48 | page
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultHandler {
    /// Wraps the userfaultfd a VMM passed for the RAM described by `blocks`, held in pages of
    /// `page_size` bytes (4 KiB, or 2 MiB huge pages).
    pub fn new(
        uffd: OwnedFd,
        blocks: Vec<LocalBlock>,
        pages: Arc<PageTable>,
        page_size: u64,
    ) -> Self {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the fd is owned (received with SCM_RIGHTS) and moves into the Uffd, which
        // closes it on drop; nothing else refers to it.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        FaultHandler {
            uffd,
            blocks,
            pages,
            vcpus: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            latency: Mutex::new(Latency::default()),
            stages: Mutex::new(Stages::default()),
            zeros: vec![0; MAX_RUN_PAGES as usize * PAGE_SIZE as usize],
            huge: (page_size > PAGE_SIZE).then(|| HugePageAssembly::new(page_size)),
            faults: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// Tells vCPU threads apart from other faulting threads of the VMM.
    pub fn set_vcpu_threads(&self, tids: &[u32]) {
        let mut m = lock(&self.vcpus);
        m.clear();
        for (i, &t) in tids.iter().enumerate() {
            m.insert(t, i);
        }
        lock(&self.latency).vcpu_blocked = vec![(Duration::ZERO, None); tids.len()];
    }

    /// The page table.
    pub fn pages(&self) -> &Arc<PageTable> {
        &self.pages
    }

    /// Wakes every thread waiting on a fault anywhere in guest RAM: a fault that a umemd read
    /// before it died was never answered, and its thread faults again (and is read here) if
    /// its page is still missing.
    pub fn wake_all(&self) {
        for b in &self.blocks {
            if let Err(e) = self
                .uffd
                .wake(b.host_addr as *mut libc::c_void, b.desc.size as usize)
            {
                log::warn!("waking the faults on {}: {e}", b.desc.name);
            }
        }
    }

    /// Makes `serve` return.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Bytes the kernel places or finds present at a time: a huge page, or a page.
    fn page_size(&self) -> u64 {
        self.huge
            .as_ref()
            .map_or(PAGE_SIZE, |h| h.per() * PAGE_SIZE)
    }

    /// Block and page of a faulting address in the VMM.
    fn locate(&self, addr: u64) -> Option<(u32, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let off = addr.checked_sub(b.host_addr)?;
            (off < b.desc.size).then_some((i as u32, off / PAGE_SIZE))
        })
    }

    fn host_addr(&self, block: u32, page: u64) -> u64 {
        self.blocks[block as usize].host_addr + page * PAGE_SIZE
    }

    /// Places `data` (whole pages) at `first` of `block` wherever a page is not already present,
    /// waking every fault on them. Returns the pages placed. The caller bounds-checked the run.
    pub fn place(&self, block: u32, first: u64, data: &[u8]) -> Result<u64, FaultError> {
        self.place_arrived(block, first, data, None)
    }

    /// [`FaultHandler::place`] for pages read off the urgent channel at `arrived`: the time
    /// of each requested one is split into stages ([`PostcopyStats::stage_fetch_us`]).
    pub fn place_arrived(
        &self,
        block: u32,
        first: u64,
        data: &[u8],
        arrived: Option<Instant>,
    ) -> Result<u64, FaultError> {
        if let Some(huge) = &self.huge {
            let mut placed = 0;
            for a in huge.receive(&self.pages, block, first, data)? {
                placed += self.place_huge(huge, a, arrived)?;
            }
            return Ok(placed);
        }
        let count = data.len() as u64 / PAGE_SIZE;
        let mut placed = 0;
        let mut i = 0;
        while i < count {
            if self.pages.get(block, first + i) == PageState::Present {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < count
                && j - i < PLACE_PAGES
                && self.pages.get(block, first + j) != PageState::Present
            {
                j += 1;
            }
            let src = &data[(i * PAGE_SIZE) as usize..(j * PAGE_SIZE) as usize];
            self.copy(self.host_addr(block, first + i), src)?;
            let now = Instant::now();
            self.pages.update_range(
                block,
                first + i,
                j - i,
                |_| Some(PageState::Present),
                |p, was| {
                    if was == PageState::Requested {
                        self.resolved(block, p, now, arrived);
                    }
                },
            );
            placed += j - i;
            i = j;
        }
        Ok(placed)
    }

    /// Places a huge page assembled whole, then resolves every fault on it. Returns the pages
    /// placed.
    fn place_huge(
        &self,
        huge: &HugePageAssembly,
        a: Assembled,
        arrived: Option<Instant>,
    ) -> Result<u64, FaultError> {
        let (block, head) = (a.block, a.first);
        let r = self.copy(self.host_addr(block, head), &a.data);
        huge.placed(a);
        r?;
        let now = Instant::now();
        self.pages.update_range(
            block,
            head,
            huge.per(),
            |_| Some(PageState::Present),
            |p, was| {
                if was == PageState::Requested && p != head {
                    self.resolved(block, p, now, arrived);
                }
            },
        );
        // Faults on a huge page wait on its first page.
        self.resolved(block, head, now, arrived);
        Ok(huge.per())
    }

    /// Records that pages read as zero. Pages a fault already waits for are placed now; the
    /// rest stay absent, costing no memory, until touched or until the kernel's zero fill.
    pub fn zero(&self, block: u32, first: u64, count: u64) -> Result<(), FaultError> {
        if let Some(huge) = &self.huge {
            return self.zero_huge(huge, block, first, count);
        }
        let mut waited_for = Vec::new();
        self.pages.update_range(
            block,
            first,
            count,
            |s| (s == PageState::Missing).then_some(PageState::Zero),
            |p, was| {
                if was == PageState::Requested {
                    waited_for.push(p);
                }
            },
        );
        for p in waited_for {
            self.place(block, p, &self.zeros[..PAGE_SIZE as usize])?;
        }
        Ok(())
    }

    /// [`FaultHandler::zero`] on huge pages: a huge page that a fault waits for, or that was
    /// partly received, may now be complete.
    fn zero_huge(
        &self,
        huge: &HugePageAssembly,
        block: u32,
        first: u64,
        count: u64,
    ) -> Result<(), FaultError> {
        self.pages.update_range(
            block,
            first,
            count,
            |s| s.is_unresolved().then_some(PageState::Zero),
            |_, _| {},
        );
        let mut head = huge.head(first);
        while head < first + count {
            let waited_for = lock(&self.waiters).contains_key(&key(block, head));
            if waited_for || huge.holds_any(block, head) {
                if let Some(a) = huge.complete(&self.pages, block, head) {
                    self.place_huge(huge, a, None)?;
                }
            }
            head += huge.per();
        }
        Ok(())
    }

    fn resolved(&self, block: u32, page: u64, now: Instant, arrived: Option<Instant>) {
        {
            let mut st = lock(&self.stages);
            if let (Some(sent), Some(arrived)) = (st.sent.remove(&key(block, page)), arrived) {
                Stages::push(&mut st.fetch, arrived.saturating_duration_since(sent));
                Stages::push(&mut st.place, now.saturating_duration_since(arrived));
            }
        }
        let Some(ws) = lock(&self.waiters).remove(&key(block, page)) else {
            return;
        };
        let mut lat = lock(&self.latency);
        for (vcpu, since) in ws {
            lat.record(now.saturating_duration_since(since));
            if let Some(v) = vcpu {
                lat.unblock(v, now);
            }
        }
    }

    /// One `UFFDIO_COPY` per run, stepping over pages that turned out to be present already.
    fn copy(&self, addr: u64, src: &[u8]) -> Result<(), FaultError> {
        let mut done = 0usize;
        let mut eagain = 0;
        while done < src.len() {
            let left = src.len() - done;
            let dst = addr + done as u64;
            // SAFETY: `dst..dst+left` lies inside a RAM block the VMM registered with this
            // userfaultfd (the caller bounds-checked the page run against the layout), and the
            // kernel copies from `src`, a live buffer of `left` bytes, into the VMM's address
            // space, never into ours.
            let r = unsafe {
                self.uffd.copy(
                    src[done..].as_ptr().cast(),
                    dst as *mut libc::c_void,
                    left,
                    true,
                )
            };
            match r {
                Ok(n) if n > 0 => done += n,
                Ok(_) => {
                    return Err(FaultError::Place {
                        addr: dst,
                        len: left,
                        err: "UFFDIO_COPY copied nothing".into(),
                    })
                }
                // Part copied; the page after it is usually one that already exists.
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 && n < left => done += n,
                // The crate reports EAGAIN (mappings changing) as a huge partial count.
                Err(userfaultfd::Error::PartiallyCopied(_)) => {
                    eagain += 1;
                    if eagain > MAX_EAGAIN {
                        return Err(FaultError::Place {
                            addr: dst,
                            len: left,
                            err: "UFFDIO_COPY kept failing with EAGAIN".into(),
                        });
                    }
                    std::thread::yield_now();
                }
                // The crate speaks another nix version's Errno: compare raw numbers.
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // Present already (placed by another path): wake anyone who queued on it.
                    let step = self.page_size() as usize;
                    let _ = self.uffd.wake(dst as *mut libc::c_void, step);
                    done += step;
                }
                Err(e) => {
                    return Err(FaultError::Place {
                        addr: dst,
                        len: left,
                        err: e.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads faults until [`FaultHandler::stop`]: each missing page is requested once through
    /// `request`; a fault on a page that read as zero is resolved here; a fault on a page that
    /// arrived meanwhile is woken.
    pub fn serve(
        &self,
        mut request: impl FnMut(&[PageRun]) -> std::io::Result<()>,
    ) -> Result<(), FaultError> {
        let mut buf = EventBuffer::new(64);
        let mut runs: Vec<PageRun> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(POLL_MS)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(FaultError::Read(e.to_string())),
            }
            let events = self
                .uffd
                .read_events(&mut buf)
                .map_err(|e| FaultError::Read(format!("{e:?}")))?;
            let now = Instant::now();
            runs.clear();
            for ev in events {
                match ev {
                    Ok(Event::Pagefault {
                        addr, thread_id, ..
                    }) => {
                        self.faults.fetch_add(1, Ordering::Relaxed);
                        self.fault(addr as u64, thread_id.as_raw() as u32, now, &mut runs)?;
                    }
                    Ok(other) => debug!("userfaultfd event ignored: {other:?}"),
                    Err(e) => return Err(FaultError::Read(e.to_string())),
                }
            }
            if !runs.is_empty() {
                self.requested
                    .fetch_add(runs.iter().map(|r| r.count as u64).sum(), Ordering::Relaxed);
                // Stamped before the write: the answer may be placed before it returns.
                self.stamp_requests(&runs, now);
                request(&runs).map_err(FaultError::Request)?;
            }
        }
        Ok(())
    }

    /// Notes when `runs`, whose faults were read at `read`, go out.
    fn stamp_requests(&self, runs: &[PageRun], read: Instant) {
        let sent = Instant::now();
        let waited = sent.saturating_duration_since(read);
        let mut st = lock(&self.stages);
        // A page that landed before its request left (pushed meanwhile) is never resolved
        // as requested and would stay here: forget them all now and then.
        if st.sent.len() >= MAX_SAMPLES {
            st.sent.clear();
        }
        for r in runs {
            for p in r.first..r.first + r.count as u64 {
                st.sent.insert(key(r.block, p), sent);
                Stages::push(&mut st.request, waited);
            }
        }
    }

    fn fault(
        &self,
        addr: u64,
        tid: u32,
        now: Instant,
        runs: &mut Vec<PageRun>,
    ) -> Result<(), FaultError> {
        let Some((block, page)) = self.locate(addr) else {
            warn!("fault at {addr:#x} outside guest RAM ignored");
            return Ok(());
        };
        let vcpu = lock(&self.vcpus).get(&tid).copied();
        if let Some(huge) = &self.huge {
            return self.fault_huge(huge, block, page, vcpu, now, runs);
        }
        loop {
            match self.pages.get(block, page) {
                PageState::Present => {
                    let a = self.host_addr(block, page) as *mut libc::c_void;
                    let _ = self.uffd.wake(a, PAGE_SIZE as usize);
                    return Ok(());
                }
                PageState::Zero => {
                    // Resolved here, without the network; it still counts as a served fault.
                    self.place(block, page, &self.zeros[..PAGE_SIZE as usize])?;
                    lock(&self.latency).record(now.elapsed());
                    return Ok(());
                }
                PageState::Requested => {
                    self.wait(block, page, vcpu, now);
                    return Ok(());
                }
                PageState::Missing => {
                    if self
                        .pages
                        .transition(block, page, PageState::Missing, PageState::Requested)
                        != PageState::Missing
                    {
                        continue;
                    }
                    self.wait(block, page, vcpu, now);
                    push_page(runs, block, page);
                    return Ok(());
                }
            }
        }
    }

    /// A fault on RAM of huge pages: the whole huge page is what the kernel waits for, so
    /// every page of it that is neither here, nor zero, nor asked for already is requested,
    /// and the fault waits on the huge page's first page.
    fn fault_huge(
        &self,
        huge: &HugePageAssembly,
        block: u32,
        page: u64,
        vcpu: Option<usize>,
        now: Instant,
        runs: &mut Vec<PageRun>,
    ) -> Result<(), FaultError> {
        let head = huge.head(page);
        if self.pages.get(block, head) == PageState::Present {
            let a = self.host_addr(block, head) as *mut libc::c_void;
            let _ = self.uffd.wake(a, self.page_size() as usize);
            return Ok(());
        }
        let received = huge.received(block, head);
        for i in 0..huge.per() {
            let p = head + i;
            if !received.get(i as usize).copied().unwrap_or(false)
                && self
                    .pages
                    .transition(block, p, PageState::Missing, PageState::Requested)
                    == PageState::Missing
            {
                push_page(runs, block, p);
            }
        }
        self.wait(block, head, vcpu, now);
        // Complete already (every page of it zero, or the last one came meanwhile): placed
        // now, which resolves the wait.
        if let Some(a) = huge.complete(&self.pages, block, head) {
            self.place_huge(huge, a, None)?;
        }
        Ok(())
    }

    fn wait(&self, block: u32, page: u64, vcpu: Option<usize>, now: Instant) {
        lock(&self.waiters)
            .entry(key(block, page))
            .or_default()
            .push((vcpu, now));
        if let Some(v) = vcpu {
            lock(&self.latency).block(v, now);
        }
        // The page may have landed between the state check and the registration.
        if self.pages.get(block, page) == PageState::Present {
            self.resolved(block, page, Instant::now(), None);
        }
    }

    /// The latency histogram and the sum of its latencies (microseconds), read together.
    pub fn latency_histogram(&self) -> ([u64; LATENCY_BUCKETS], u64) {
        let lat = lock(&self.latency);
        (lat.hist, lat.sum_us)
    }

    /// Fills the fault-side counters of `s`.
    pub fn stats(&self, s: &mut PostcopyStats) {
        s.faults = self.faults.load(Ordering::Relaxed);
        s.pages_requested = self.requested.load(Ordering::Relaxed);
        s.remaining_pages = self.pages.unresolved();
        let lat = lock(&self.latency);
        s.latency_hist = lat.hist;
        s.latency_max_us = lat.max_us;
        let mut samples = lat.samples.clone();
        let now = Instant::now();
        s.vcpu_blocked_us = lat
            .vcpu_blocked
            .iter()
            .map(|(d, since)| {
                (*d + since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)))
                    .as_micros() as u64
            })
            .collect();
        let all = lat
            .all_blocked_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        s.vm_blocked_us = (lat.vm_blocked + all).as_micros() as u64;
        drop(lat);
        s.latency_p50_us = Latency::percentile(&mut samples, 0.50);
        s.latency_p99_us = Latency::percentile(&mut samples, 0.99);
        // Copied under the lock, ordered outside it: the fault thread takes it every batch.
        let st = lock(&self.stages);
        let (mut request, mut fetch, mut place) =
            (st.request.clone(), st.fetch.clone(), st.place.clone());
        drop(st);
        s.stage_request_us = Stages::quantiles(&mut request);
        s.stage_fetch_us = Stages::quantiles(&mut fetch);
        s.stage_place_us = Stages::quantiles(&mut place);
    }
}

/// Adds `page` to the requests in `runs`, extending the last run where it continues it.
fn push_page(runs: &mut Vec<PageRun>, block: u32, page: u64) {
    match runs.last_mut() {
        Some(r)
            if r.block == block && r.first + r.count as u64 == page && r.count < MAX_RUN_PAGES =>
        {
            r.count += 1
        }
        _ => runs.push(PageRun {
            block,
            first: page,
            count: 1,
        }),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;

    pub(in crate::dest) const PAGES: u64 = 64;

    /// A shared mapping of a sealed memfd registered with a real userfaultfd, as a destination
    /// VMM makes it; `None` where userfaultfd is not allowed.
    pub(in crate::dest) fn registered_ram() -> Option<(std::fs::File, *mut u8, FaultHandler)> {
        let len = PAGES * PAGE_SIZE;
        registered_memfd(crate::testutil::sealed_memfd(len), len, PAGE_SIZE)
    }

    /// [`registered_ram`] for `f`, `len` bytes in pages of `page_size`.
    fn registered_memfd(
        f: std::fs::File,
        len: u64,
        page_size: u64,
    ) -> Option<(std::fs::File, *mut u8, FaultHandler)> {
        let len = len as usize;
        let uffd = match userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
        {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIP fault handler test: userfaultfd unavailable: {e}");
                return None;
            }
        };
        // SAFETY: a fresh shared mapping of our own memfd, unmapped never (the test is short).
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                f.as_fd(),
                0,
            )
        }
        .unwrap()
        .as_ptr() as *mut u8;
        uffd.register(ptr.cast(), len).unwrap();
        let blocks = vec![LocalBlock {
            desc: proto::BlockDesc {
                name: "ram".into(),
                guest_addr: 0,
                size: len as u64,
            },
            memfd_offset: 0,
            host_addr: ptr as u64,
        }];
        let pages = Arc::new(PageTable::new(&blocks));
        // The crate's `into_raw_fd` still closes the fd when the Uffd drops: forget it instead.
        let raw = uffd.as_raw_fd();
        std::mem::forget(uffd);
        // SAFETY: `raw` is the forgotten Uffd's open fd; nothing else owns it now.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Some((f, ptr, FaultHandler::new(fd, blocks, pages, page_size)))
    }

    #[test]
    fn a_huge_page_is_placed_whole_once_every_page_of_it_arrived_or_reads_zero() {
        const PER: u64 = proto::HUGE_PAGE_SIZE / PAGE_SIZE;
        let len = 2 * proto::HUGE_PAGE_SIZE;
        let Some(f) = crate::testutil::sealed_huge_memfd(len) else {
            return;
        };
        let Some((file, ptr, fh)) = registered_memfd(f, len, proto::HUGE_PAGE_SIZE) else {
            return;
        };
        let (fh, rx, server) = serving(fh);
        let wait = Duration::from_secs(10);
        let data = |first: u64, count: u64| -> Vec<u8> {
            (first..first + count)
                .flat_map(|p| vec![(p % 251) as u8 + 1; PAGE_SIZE as usize])
                .collect()
        };

        // A fault anywhere in huge page 0 asks for all of it.
        fh.place(0, 0, &data(0, 10)).unwrap();
        let reader = touch(ptr, 300);
        let runs = rx.recv_timeout(wait).expect("a request");
        let asked: u64 = runs.iter().map(|r| r.count as u64).sum();
        assert_eq!(asked, PER - 10, "every page not here yet: {runs:?}");
        assert!(runs
            .iter()
            .all(|r| r.first >= 10 && r.first + r.count as u64 <= PER));
        // Part of it arrived, part reads zero: nothing is placed yet.
        fh.place(0, 10, &data(10, 290)).unwrap();
        fh.zero(0, 300, 100).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "a huge page placed in part");
        assert_eq!(fh.pages().get(0, 0), PageState::Missing);
        // The last pages complete it: placed whole, and the fault is resolved.
        fh.place(0, 400, &data(400, PER - 400)).unwrap();
        assert_eq!(reader.join().unwrap(), 0, "page 300 reads zero");
        let mut back = vec![0u8; proto::HUGE_PAGE_SIZE as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        for p in 0..PER {
            let want = if (300..400).contains(&p) {
                0
            } else {
                (p % 251) as u8 + 1
            };
            let at = (p * PAGE_SIZE) as usize;
            assert!(
                back[at..at + PAGE_SIZE as usize].iter().all(|&b| b == want),
                "page {p}"
            );
        }
        assert_eq!(fh.pages().unresolved(), PER, "huge page 1 still to come");

        // A huge page that reads zero throughout is placed on the fault, with no request.
        fh.zero(0, PER, PER).unwrap();
        assert_eq!(touch(ptr, PER + 7).join().unwrap(), 0);
        assert!(
            rx.try_recv().is_err(),
            "no request for a huge page of zeros"
        );
        // Arriving again once placed is harmless.
        assert_eq!(fh.place(0, 0, &data(0, 4)).unwrap(), 0);
        fh.stop();
        server.join().unwrap().unwrap();
    }

    /// Reads the first word of `page` in another thread (it blocks until the page is there).
    pub(in crate::dest) fn touch(ptr: *mut u8, page: u64) -> std::thread::JoinHandle<u64> {
        let addr = ptr as usize + (page * PAGE_SIZE) as usize;
        std::thread::spawn(move || {
            // SAFETY: inside the test's live mapping; the read blocks until resolved.
            unsafe { std::ptr::read_volatile(addr as *const u64) }
        })
    }

    /// `fh` serving faults in a thread of its own, its requests sent to the receiver.
    #[allow(clippy::type_complexity)]
    pub(in crate::dest) fn serving(
        fh: FaultHandler,
    ) -> (
        Arc<FaultHandler>,
        mpsc::Receiver<Vec<PageRun>>,
        std::thread::JoinHandle<Result<(), FaultError>>,
    ) {
        let fh = Arc::new(fh);
        let (tx, rx) = mpsc::channel();
        let server = {
            let fh = fh.clone();
            std::thread::spawn(move || {
                fh.serve(|runs| tx.send(runs.to_vec()).map_err(std::io::Error::other))
            })
        };
        (fh, rx, server)
    }

    #[test]
    fn faults_are_requested_once_and_resolved_by_placed_runs() {
        let Some((file, ptr, fh)) = registered_ram() else {
            return;
        };
        let (fh, rx, server) = serving(fh);
        let wait = Duration::from_secs(10);

        // A read of a missing page becomes one request, and waits for the page.
        let reader = touch(ptr, 5);
        let Ok(runs) = rx.recv_timeout(wait) else {
            panic!(
                "no request; the fault reader ended with {:?}",
                server.join()
            );
        };
        assert_eq!(
            runs,
            vec![PageRun {
                block: 0,
                first: 5,
                count: 1
            }]
        );
        assert_eq!(fh.pages().get(0, 5), PageState::Requested);
        // A run around it is placed with one copy, and wakes the reader.
        let data = vec![0xabu8; 4 * PAGE_SIZE as usize];
        assert_eq!(fh.place(0, 4, &data).unwrap(), 4);
        assert_eq!(reader.join().unwrap(), 0xabab_abab_abab_abab);
        assert_eq!(fh.pages().get(0, 7), PageState::Present);

        // A page that is present already (here written through another path) is stepped over
        // (EEXIST) while the rest of the run is placed.
        file.write_all_at(&[0x11; 4096], 10 * PAGE_SIZE).unwrap();
        let data = vec![0x22u8; 3 * PAGE_SIZE as usize];
        assert_eq!(fh.place(0, 9, &data).unwrap(), 3);
        let mut b = [0u8; 1];
        for (page, want) in [(9, 0x22), (10, 0x11), (11, 0x22)] {
            file.read_exact_at(&mut b, page * PAGE_SIZE).unwrap();
            assert_eq!(b[0], want, "page {page}");
        }
        // Arriving twice is harmless.
        assert_eq!(fh.place(0, 4, &vec![0xcd; 4096]).unwrap(), 0);

        // A run longer than one copy places is placed in pieces, each page where it belongs.
        let (at, n) = (31, 2 * PLACE_PAGES + 1);
        let data: Vec<u8> = (0..n)
            .flat_map(|i| [i as u8 + 1; PAGE_SIZE as usize])
            .collect();
        assert_eq!(fh.place(0, at, &data).unwrap(), n);
        for i in 0..n {
            file.read_exact_at(&mut b, (at + i) * PAGE_SIZE).unwrap();
            assert_eq!(b[0], i as u8 + 1, "page {}", at + i);
        }

        // Pages announced as zero are placed locally when touched: no request.
        fh.zero(0, 20, 4).unwrap();
        assert_eq!(fh.pages().unresolved(), PAGES - 7 - n - 4);
        assert_eq!(touch(ptr, 21).join().unwrap(), 0);
        assert!(rx.try_recv().is_err(), "no request for a zero page");
        // A requested page that then turns out to be zero is placed at once.
        let reader = touch(ptr, 30);
        rx.recv_timeout(wait).expect("a request");
        fh.zero(0, 30, 1).unwrap();
        assert_eq!(reader.join().unwrap(), 0);

        let mut s = PostcopyStats::default();
        fh.stats(&mut s);
        assert!(s.faults >= 3, "{s:?}");
        assert_eq!(s.pages_requested, 2);
        assert_eq!(s.latency_hist.iter().sum::<u64>(), 3);
        let (hist, _) = fh.latency_histogram();
        assert_eq!(hist, s.latency_hist);
        fh.stop();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_requested_page_s_time_is_split_into_stages() {
        let Some((_file, ptr, fh)) = registered_ram() else {
            return;
        };
        let (fh, rx, server) = serving(fh);
        let wait = Duration::from_secs(10);
        let page = vec![0x5au8; PAGE_SIZE as usize];

        // Requested, on the way for 30 ms, then 10 ms from its arrival to its placing.
        let reader = touch(ptr, 3);
        rx.recv_timeout(wait).expect("a request");
        std::thread::sleep(Duration::from_millis(30));
        let arrived = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
        fh.place_arrived(0, 3, &page, Some(arrived)).unwrap();
        assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        // Requested, then pushed in the background: it has no fetch or place stage.
        let reader = touch(ptr, 8);
        rx.recv_timeout(wait).expect("a request");
        fh.place(0, 8, &page).unwrap();
        reader.join().unwrap();

        let mut s = PostcopyStats::default();
        fh.stats(&mut s);
        let ms = |us: u64| us / 1000;
        assert!(ms(s.stage_fetch_us[0]) >= 30, "{s:?}");
        assert_eq!(
            s.stage_fetch_us[0], s.stage_fetch_us[1],
            "one sample: {s:?}"
        );
        assert!((10..1000).contains(&ms(s.stage_place_us[0])), "{s:?}");
        assert!(s.stage_request_us[1] < s.stage_fetch_us[0], "{s:?}");
        fh.stop();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn latency_buckets_and_percentiles() {
        let mut l = Latency::default();
        for us in [0u64, 1, 2, 3, 900, 5000] {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.hist[0], 2, "0 and 1 us");
        assert_eq!(l.hist[1], 2, "2 and 3 us");
        assert_eq!(l.hist[9], 1, "900 us");
        assert_eq!(l.hist[12], 1, "5000 us");
        let mut s = l.samples.clone();
        assert_eq!(Latency::percentile(&mut s, 0.5), 2);
        assert_eq!(Latency::percentile(&mut s, 0.99), 5000);
        assert_eq!(l.max_us, 5000);
        assert_eq!(l.sum_us, 5906, "the sum of every latency");
    }

    #[test]
    fn vm_blocked_only_while_every_vcpu_waits() {
        let mut l = Latency {
            vcpu_blocked: vec![(Duration::ZERO, None); 2],
            ..Default::default()
        };
        let t0 = Instant::now();
        l.block(0, t0);
        l.block(1, t0 + Duration::from_millis(10));
        l.unblock(0, t0 + Duration::from_millis(15));
        l.unblock(1, t0 + Duration::from_millis(30));
        assert_eq!(l.vm_blocked, Duration::from_millis(5));
        assert_eq!(l.vcpu_blocked[0].0, Duration::from_millis(15));
        assert_eq!(l.vcpu_blocked[1].0, Duration::from_millis(20));
    }
}
