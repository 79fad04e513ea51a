//! The machine alone, as a yardstick beside the migrations: the time to fill a fresh memfd of a
//! scenario's size with whole-page writes. Every page a destination places without
//! preallocation costs at least this (an allocation, its zeroing or charge, one copy), whoever
//! the engine; where the host backs guest memory lazily, it is also the figure that moves most
//! from one run to the next.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::json;

use crate::progress::Progress;
use crate::{Run, Scenario};

/// Bytes written by one `pwrite`.
const CHUNK: usize = 1 << 20;

/// Fills a memfd of `s.mem` and reports its rate as the scenario's throughput.
pub fn run(s: &Scenario) -> Result<Run, String> {
    let bytes = vmm::parse_size(s.mem)?;
    let file = fresh_memfd("umem-bench-fill", bytes)?;
    let t = Instant::now();
    fill(&file, bytes)?;
    Ok(row(s, bytes, t.elapsed().as_secs_f64(), json!({})))
}

/// Writes `bytes` of data into `file` from its start, `CHUNK` per `pwrite`.
pub(crate) fn fill(file: &std::fs::File, bytes: u64) -> Result<(), String> {
    let buf = vec![0x5au8; CHUNK];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(CHUNK as u64) as usize;
        file.write_all_at(&buf[..n], off)
            .map_err(|e| format!("pwrite at {off:#x}: {e}"))?;
        off += n as u64;
    }
    Ok(())
}

/// A machine row: `bytes` in `secs`, with `extra` fields.
pub(crate) fn row(s: &Scenario, bytes: u64, secs: f64, extra: serde_json::Value) -> Run {
    let mut row = json!({
        "scenario": s.name,
        "engine": "machine",
        "mode": s.mode,
        "ram": s.mem,
        "bytes_sent": bytes,
        "total_ms": secs * 1e3,
        "throughput_gbps": bytes as f64 / secs / 1e9,
    });
    if let (Some(row), Some(extra)) = (row.as_object_mut(), extra.as_object()) {
        row.extend(extra.clone());
    }
    Run {
        row,
        progress: Progress::default(),
    }
}

/// Bytes placed by one `UFFDIO_COPY` or `UFFDIO_CONTINUE`, as umemd's destination does.
const PLACE_STEP: usize = 256 << 10;

/// How a destination could place pages once the VM runs, with no VM: the ioctls on a memfd
/// registered with a userfaultfd, one thread, `PLACE_STEP` at a time, from a buffer or from a
/// loopback TCP connection that a second thread feeds with `sendfile`, as a source umemd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// `UFFDIO_COPY` from a buffer into fresh memory (MISSING mode): each call allocates the
    /// pages and copies into them.
    Copy,
    /// MINOR mode: the memfd preallocated beforehand with `fallocate` (timed apart, as it
    /// would run before the switchover), the data written into it with `pwrite`, then
    /// `UFFDIO_CONTINUE` maps it where the VM would fault.
    Minor,
    /// What umemd's destination does: `read` from the socket into a buffer, then
    /// `UFFDIO_COPY`.
    ReceiveCopy,
    /// Fed from the socket with no copy in user space: `splice` from the socket into a pipe
    /// and from the pipe into the memfd, whole pages at a time, then `UFFDIO_WAKE` for any
    /// fault waiting on them (MISSING mode: a page in the memfd no longer faults).
    ReceiveSplice,
    /// The same into a memfd preallocated beforehand, in MINOR mode: `UFFDIO_CONTINUE` maps
    /// the pages once written.
    ReceiveSpliceMinor,
}

impl Placement {
    fn minor(self) -> bool {
        matches!(self, Placement::Minor | Placement::ReceiveSpliceMinor)
    }

    fn receives(self) -> bool {
        matches!(
            self,
            Placement::ReceiveCopy | Placement::ReceiveSplice | Placement::ReceiveSpliceMinor
        )
    }
}

/// A shared mapping of `len` bytes of `file`, unmapped on drop.
pub(crate) struct Shared {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl Shared {
    pub(crate) fn new(file: &std::fs::File, len: usize) -> Result<Self, String> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        use std::os::fd::AsFd;
        let size = std::num::NonZeroUsize::new(len).ok_or("an empty mapping")?;
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases nothing of ours.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(|e| format!("mmap: {e}"))?;
        Ok(Shared { ptr, len })
    }

    pub(crate) fn at(&self, off: usize) -> *mut libc::c_void {
        // SAFETY: callers pass offsets below `len`, inside the mapping.
        unsafe { self.ptr.as_ptr().cast::<u8>().add(off).cast() }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, which nothing refers to any more.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// An empty memfd of `bytes`.
pub(crate) fn fresh_memfd(name: &str, bytes: u64) -> Result<std::fs::File, String> {
    fresh_memfd_on(name, bytes, None)
}

/// A fresh memfd of `bytes`, on huge pages of `huge` size if given.
pub(crate) fn fresh_memfd_on(
    name: &str,
    bytes: u64,
    huge: Option<memfd::HugetlbSize>,
) -> Result<std::fs::File, String> {
    let file = memfd::MemfdOptions::default()
        .hugetlb(huge)
        .create(name)
        .map_err(|e| format!("memfd: {e}"))?
        .into_file();
    file.set_len(bytes).map_err(|e| format!("ftruncate: {e}"))?;
    Ok(file)
}

/// A loopback connection whose far end a thread fills with `bytes` of a prefilled memfd, with
/// `sendfile`, as a source umemd sends pages; at the push's nice value if `background`.
pub(crate) fn sending_peer(
    bytes: u64,
    background: bool,
) -> Result<(TcpStream, JoinHandle<Result<(), String>>), String> {
    let src = fresh_memfd("umem-bench-source", bytes)?;
    fill(&src, bytes)?;
    let (sock, far) = loopback()?;
    let sender = std::thread::spawn(move || {
        if background {
            umemd::priority::lower_priority();
        }
        let mut off: libc::off64_t = 0;
        while (off as u64) < bytes {
            let n = (bytes - off as u64).min(CHUNK as u64) as usize;
            nix::sys::sendfile::sendfile64(&far, &src, Some(&mut off), n)
                .map_err(|e| format!("sendfile: {e}"))?;
        }
        Ok(())
    });
    Ok((sock, sender))
}

/// Both ends of a fresh loopback TCP connection: the one accepted, the one that connected.
pub(crate) fn loopback() -> Result<(TcpStream, TcpStream), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let connected = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let (accepted, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    Ok((accepted, connected))
}

/// Moves up to `n` bytes from `from` to `to` with `splice`, at `*to_off` when `to` is a file
/// (advanced past them). Returns the bytes moved, 0 at the end of `from`.
fn splice_some(
    from: impl AsFd,
    to: impl AsFd,
    to_off: Option<&mut libc::loff_t>,
    n: usize,
) -> Result<usize, String> {
    use nix::fcntl::{splice, SpliceFFlags};
    let mut to_off = to_off;
    loop {
        let off = to_off.as_deref_mut();
        match splice(&from, None, &to, off, n, SpliceFFlags::SPLICE_F_MOVE) {
            Err(nix::errno::Errno::EINTR) => {}
            r => return r.map_err(|e| format!("splice: {e}")),
        }
    }
}

/// Receives exactly `n` bytes from `sock` into `file` at `off`, through `pipe`: a socket's
/// data fills a pipe a fragment per slot, not a page, so each splice in is drained out before
/// the next.
fn splice_receive(
    sock: &TcpStream,
    pipe: &(OwnedFd, OwnedFd),
    file: &std::fs::File,
    off: u64,
    n: usize,
) -> Result<(), String> {
    const PAGE: usize = 4096;
    let mut at = off as libc::loff_t;
    let (mut read, mut written) = (0, 0);
    while written < n {
        if read < n {
            match splice_some(sock, &pipe.1, None, n - read)? {
                0 => return Err("splice: the sender closed early".into()),
                k => read += k,
            }
        }
        // Whole pages only: a page written in part would be completed with zeros and could
        // be read so before the rest arrives.
        let whole = (read - written) / PAGE * PAGE;
        let mut out = 0;
        while out < whole {
            match splice_some(&pipe.0, file, Some(&mut at), whole - out)? {
                0 => return Err("splice: the pipe ran dry".into()),
                m => out += m,
            }
        }
        written += whole;
    }
    Ok(())
}

/// Places a scenario's size of data with `how` and reports its rate as the throughput; MINOR
/// mode's preallocation is reported apart (`prealloc_ms`).
pub fn place(s: &Scenario, how: Placement) -> Result<Run, String> {
    use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
    let bytes = vmm::parse_size(s.mem)?;
    let len = usize::try_from(bytes).map_err(|e| e.to_string())?;
    // The source's memory is filled first, for every variant alike: on a host that backs
    // guest memory lazily, what is allocated first is cheaper.
    let (mut sock, sender) = match how.receives() {
        true => {
            let (sock, sender) = sending_peer(bytes, false)?;
            (Some(sock), Some(sender))
        }
        false => (None, None),
    };
    let file = fresh_memfd("umem-bench-place", bytes)?;
    let (features, mode) = if how.minor() {
        // UFFD_FEATURE_MINOR_SHMEM (Linux 5.14), which the crate has no name for.
        (FeatureFlags::from_bits_retain(1 << 10), RegisterMode::MINOR)
    } else {
        (FeatureFlags::MISSING_SHMEM, RegisterMode::MISSING)
    };
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(false)
        .require_features(features)
        .create()
        .map_err(|e| format!("userfaultfd: {e}"))?;
    let vm = Shared::new(&file, len)?;
    uffd.register_with_mode(vm.at(0), len, mode)
        .map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    let mut buf = vec![0x5au8; PLACE_STEP];
    let mut prealloc_ms = 0.0;
    if how.minor() {
        let t = Instant::now();
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            bytes as libc::off_t,
        )
        .map_err(|e| format!("fallocate: {e}"))?;
        prealloc_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    let pipe = match how {
        Placement::ReceiveSplice | Placement::ReceiveSpliceMinor => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("pipe: {e}"))?;
            // A pipe holds 64 KiB unless told otherwise; a step goes through it whole.
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PLACE_STEP as i32))
                .map_err(|e| format!("F_SETPIPE_SZ: {e}"))?;
            Some((r, w))
        }
        _ => None,
    };
    let t = Instant::now();
    let mut write = std::time::Duration::ZERO;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PLACE_STEP);
        let w = Instant::now();
        match (how, sock.as_mut(), pipe.as_ref()) {
            (Placement::Minor, ..) => file
                .write_all_at(&buf[..n], off as u64)
                .map_err(|e| format!("pwrite at {off:#x}: {e}"))?,
            (Placement::ReceiveCopy, Some(sock), _) => sock
                .read_exact(&mut buf[..n])
                .map_err(|e| format!("read: {e}"))?,
            (Placement::ReceiveSplice | Placement::ReceiveSpliceMinor, Some(sock), Some(pipe)) => {
                splice_receive(sock, pipe, &file, off as u64, n)?
            }
            _ => {}
        }
        write += w.elapsed();
        if how.minor() {
            uffd.r#continue(vm.at(off), n, true)
                .map_err(|e| format!("UFFDIO_CONTINUE at {off:#x}: {e}"))?;
        } else if how == Placement::ReceiveSplice {
            uffd.wake(vm.at(off), n)
                .map_err(|e| format!("UFFDIO_WAKE at {off:#x}: {e}"))?;
        } else {
            // SAFETY: `off..off+n` lies inside the registered mapping `vm` and `buf` holds `n`
            // bytes; the kernel copies into the memfd's new pages, not into ours.
            let r = unsafe { uffd.copy(buf.as_ptr().cast(), vm.at(off), n, true) };
            r.map_err(|e| format!("UFFDIO_COPY at {off:#x}: {e}"))?;
        }
        off += n;
    }
    let secs = t.elapsed().as_secs_f64();
    if let Some(sender) = sender {
        sender.join().map_err(|_| "the sender panicked")??;
    }
    Ok(row(
        s,
        bytes,
        secs,
        json!({
            "prealloc_ms": prealloc_ms,
            // Of total_ms, the part spent getting the data (pwrite, read, splice); the rest
            // is the UFFDIO_COPY or UFFDIO_CONTINUE.
            "write_ms": write.as_secs_f64() * 1e3,
        }),
    ))
}
