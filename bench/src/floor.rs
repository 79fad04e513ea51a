//! The floor under a fault served from another host, on this machine, with no VM and no umemd:
//! a thread reads a missing page of a memfd registered with a userfaultfd, a handler thread
//! reads the fault, asks a server thread for the page over loopback TCP, and places what comes
//! back with `UFFDIO_COPY`. The wake-ups are umemd's (the handler on the userfaultfd, the server
//! on the request, the handler on the page, the faulting thread on the placement), with the same
//! short time slices on the fault's path; what is missing is umemd's bookkeeping and KVM's exit.
//! The push rows add what a background push costs the machine: a thread sending with `sendfile`
//! and a thread receiving into fresh memory, both at the push's nice value, while faults are
//! served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

use crate::machine::{fill, fresh_memfd, fresh_memfd_on, loopback, row, sending_peer, Shared};
use crate::{Run, Scenario};

const PAGE: usize = 4096;
/// A huge page, the unit a destination on huge pages requests and places.
const HUGE_PAGE: usize = 2 << 20;
/// Faults timed without a push (at most one per page, half the pages); with one, as many as
/// come while it runs.
const FAULTS: usize = 3000;
/// The faulting thread's work between two touches, as a guest that computes between them: a
/// busy vCPU holds a core, as in the busy-guest scenarios.
const WORK_BETWEEN: Duration = Duration::from_micros(200);
/// Bytes the push receiver reads and writes at a time, as umemd's destination places a run.
const PUSH_STEP: usize = 256 << 10;

/// Where the faulted page comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// A buffer in the handler: the userfaultfd's own round trip.
    Local,
    /// A server thread over loopback TCP, as a source umemd serves requests.
    Loopback,
    /// The same while a push of the scenario's size runs on a second connection, at the
    /// push's nice value as umemd runs it.
    LoopbackPush,
    /// The same with the push at the priority of the fault's path: what the nice value buys.
    LoopbackPushUnniced,
}

impl PageSource {
    fn pushes(self) -> bool {
        matches!(
            self,
            PageSource::LoopbackPush | PageSource::LoopbackPushUnniced
        )
    }
}

/// Serves page requests (a page index, 8 bytes) with the page of `size` bytes read from `src`,
/// until the connection closes.
fn serve(mut sock: TcpStream, src: std::fs::File, size: usize) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        umemd::priority::shorten_time_slice();
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut page = vec![0u8; size];
        let mut index = [0u8; 8];
        loop {
            match sock.read_exact(&mut index) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("server read: {e}")),
            }
            let off = u64::from_le_bytes(index) * size as u64;
            src.read_exact_at(&mut page, off)
                .map_err(|e| format!("pread at {off:#x}: {e}"))?;
            sock.write_all(&page)
                .map_err(|e| format!("server write: {e}"))?;
        }
    })
}

/// Handles the faults of the mapping at `base` (registered with `uffd`) until `stop`, each page
/// of `size` bytes fetched from `server` (or a local buffer without one) and placed with
/// `UFFDIO_COPY`.
fn handle(
    uffd: Uffd,
    base: usize,
    size: usize,
    mut server: Option<TcpStream>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(), String>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::{AsRawFd, BorrowedFd};
    std::thread::spawn(move || {
        umemd::priority::shorten_time_slice();
        let mut page = vec![0x5au8; size];
        while !stop.load(Ordering::Acquire) {
            // SAFETY: the userfaultfd lives in `uffd`, which outlives this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(uffd.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(10u8)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let at = match uffd.read_event().map_err(|e| format!("uffd read: {e}"))? {
                Some(Event::Pagefault { addr, .. }) => addr as usize & !(size - 1),
                // Non-blocking: readable once, taken since (a blocking userfaultfd always
                // polls as an error).
                None => continue,
                other => return Err(format!("unexpected userfaultfd event {other:?}")),
            };
            if let Some(sock) = server.as_mut() {
                let index = ((at - base) / size) as u64;
                sock.write_all(&index.to_le_bytes())
                    .map_err(|e| format!("request: {e}"))?;
                sock.read_exact(&mut page)
                    .map_err(|e| format!("page: {e}"))?;
            }
            // SAFETY: `at` is an address aligned to `size` inside the registered mapping that
            // just faulted, and `page` holds `size` bytes; the kernel copies into the memfd's
            // new page.
            let r = unsafe { uffd.copy(page.as_ptr().cast(), at as *mut _, size, true) };
            // Each page faults once: the toucher reads distinct pages, one at a time.
            r.map_err(|e| format!("UFFDIO_COPY at {at:#x}: {e}"))?;
        }
        Ok(())
    })
}

/// A push of `bytes` on a connection of its own: a sender with `sendfile`, a receiver writing
/// into a fresh memfd, both at the push's nice value. Returns the receiver, which ends with the
/// push and gives its bytes per second.
fn push(bytes: u64, niced: bool) -> Result<JoinHandle<Result<f64, String>>, String> {
    let (mut sock, sender) = sending_peer(bytes, niced)?;
    let dst = fresh_memfd("umem-bench-push", bytes)?;
    Ok(std::thread::spawn(move || {
        if niced {
            umemd::priority::lower_priority();
        }
        let t = Instant::now();
        let mut buf = vec![0u8; PUSH_STEP];
        let mut off = 0u64;
        while off < bytes {
            let n = (bytes - off).min(PUSH_STEP as u64) as usize;
            sock.read_exact(&mut buf[..n])
                .map_err(|e| format!("push read: {e}"))?;
            dst.write_all_at(&buf[..n], off)
                .map_err(|e| format!("push pwrite: {e}"))?;
            off += n as u64;
        }
        let rate = bytes as f64 / t.elapsed().as_secs_f64();
        sender.join().map_err(|_| "the push sender panicked")??;
        Ok(rate)
    }))
}

/// Spins for `d`, as a vCPU running guest code.
fn work(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Times faults on distinct pages of a scenario's size of fresh memory, spread over all of it;
/// 2 MiB pages of a `hugetlbfs` memfd for a scenario on huge pages.
pub fn faults(s: &Scenario, from: PageSource) -> Result<Run, String> {
    let bytes = vmm::parse_size(s.mem)?;
    let len = usize::try_from(bytes).map_err(|e| e.to_string())?;
    let size = if s.hugepages() { HUGE_PAGE } else { PAGE };
    let pages = len / size;
    let (server, sock) = match from {
        PageSource::Local => (None, None),
        PageSource::Loopback | PageSource::LoopbackPush | PageSource::LoopbackPushUnniced => {
            let src = fresh_memfd("umem-bench-served", bytes)?;
            fill(&src, bytes)?;
            let (far, sock) = loopback()?;
            let server = serve(far, src, size);
            sock.set_nodelay(true).map_err(|e| e.to_string())?;
            (Some(server), Some(sock))
        }
    };
    let (huge, feature) = match s.hugepages() {
        true => (
            Some(memfd::HugetlbSize::Huge2MB),
            userfaultfd::FeatureFlags::MISSING_HUGETLBFS,
        ),
        false => (None, userfaultfd::FeatureFlags::MISSING_SHMEM),
    };
    let file = fresh_memfd_on("umem-bench-faulted", bytes, huge)?;
    let vm = Shared::new(&file, len)?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(feature)
        .create()
        .map_err(|e| format!("userfaultfd: {e}"))?;
    uffd.register_with_mode(vm.at(0), len, RegisterMode::MISSING)
        .map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    let pushing = match from.pushes() {
        true => Some(push(bytes, from == PageSource::LoopbackPush)?),
        false => None,
    };
    let push_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = handle(uffd, vm.at(0) as usize, size, sock, stop.clone());
    let watcher = pushing.map(|p| {
        let done = push_done.clone();
        std::thread::spawn(move || {
            let r = p
                .join()
                .map_err(|_| "the push receiver panicked".to_string())
                .and_then(|r| r);
            done.store(true, Ordering::Release);
            r
        })
    });
    let mut lat = Vec::with_capacity(FAULTS);
    // Distinct pages spread over all of RAM: an odd stride visits every page of a power of two
    // once, and pages that are not a power of two in number only shorten the cycle.
    let stride = (pages / 3) | 1;
    let mut page = 0usize;
    let t = Instant::now();
    // Without a push, FAULTS faults; with one, as many as come before it ends.
    let want = match watcher {
        Some(_) => pages / 2,
        None => FAULTS.min(pages / 2),
    };
    while lat.len() < want {
        if watcher.is_some() && push_done.load(Ordering::Acquire) {
            break;
        }
        work(WORK_BETWEEN);
        page = (page + stride) % pages;
        let f = Instant::now();
        // SAFETY: `page * size` lies inside the mapping `vm`; the read faults the page in
        // through the handler, and a volatile read of one byte of it aliases nothing of ours.
        let _ = unsafe { std::ptr::read_volatile(vm.at(page * size).cast::<u8>()) };
        lat.push(f.elapsed());
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    handler.join().map_err(|_| "the fault handler panicked")??;
    let push_rate = match watcher {
        Some(w) => Some(w.join().map_err(|_| "the push watcher panicked")??),
        None => None,
    };
    if let Some(server) = server {
        server.join().map_err(|_| "the page server panicked")??;
    }
    let timed = lat.len();
    let mut us: Vec<f64> = lat.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us.get(((us.len() as f64 - 1.0) * p) as usize).copied();
    Ok(row(
        s,
        (timed * size) as u64,
        secs,
        json!({
            "faults": timed,
            "fault_p50_us": pct(0.5),
            "fault_p99_us": pct(0.99),
            "push_gbps": push_rate.map(|r| r / 1e9),
        }),
    ))
}
