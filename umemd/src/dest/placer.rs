//! The destination's placing thread. The main stream's reader hands it the pages, zero runs and
//! discards of the stream in the order they came, so that reading the next run off the socket
//! and writing the last one into guest RAM run on two cores at once: on an idle guest the one
//! thread that did both was the slower side of a migration.
//!
//! Order is kept: the thread applies the jobs one after another, and the reader waits for all
//! of them ([`Placer::flush`]) before any frame that depends on guest RAM being written (the
//! switchover, the machine state, the commit, the end of the stream).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use proto::peer::{PageRun, MAX_RUN_PAGES};
use proto::PAGE_SIZE;

use super::error::DestError;
use super::place::Placement;
use crate::priority::lower_priority;

/// Buffers of one run each (8 MiB in all): one being read into, one being placed, the rest
/// queued between them, so that the reader runs on while a placement waits for fresh memory.
/// 8 against 3: `precopy-1g-prefilled-idle` median 1.47 against 1.40 GB/s, ahead in 8 of 9
/// runs alternating.
const BUFFERS: usize = 8;
/// Jobs queued at most; zero runs and discards need no buffer, so they are bounded here.
const QUEUED_JOBS: usize = 64;

/// What the placing thread does, in the order the source sent it.
pub(super) enum Job {
    /// A run of pages, read into `buf`, at memfd offset `off`. `running`: the VM runs here, so
    /// the pages go in with `UFFDIO_COPY`.
    Pages {
        run: PageRun,
        off: u64,
        buf: Vec<u8>,
        running: bool,
    },
    /// Pages that read as zero (a zero run or a hole).
    Zero {
        block: u32,
        first: u64,
        count: u64,
        running: bool,
    },
    /// Pages dropped again (precopy only); the ranges were checked.
    Discard { block: u32, ranges: Vec<(u64, u32)> },
}

/// What the reader sends the thread.
enum Request {
    /// A job, applied in turn.
    Job(Job),
    /// Answers with the first failure since the last flush, once every job before it is done.
    Flush(SyncSender<Option<DestError>>),
}

/// The placing thread and its pool of run buffers.
pub(super) struct Placer {
    jobs: Option<SyncSender<Request>>,
    /// Buffers the thread is done with.
    free: Receiver<Vec<u8>>,
    /// Buffers back from a read that failed.
    spare: Vec<Vec<u8>>,
    /// A job failed: the reader flushes to learn why.
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Jobs are applied by the reader itself, through this (see [`Placer::place_inline`]).
    inline: Option<Placement>,
}

impl Placer {
    /// Starts the thread, which places through `placement`.
    pub(super) fn start(placement: Placement) -> Result<Self, DestError> {
        let own = placement.clone();
        let (jobs_tx, jobs) = mpsc::sync_channel(QUEUED_JOBS);
        let (free_tx, free) = mpsc::channel();
        for _ in 0..BUFFERS {
            let _ = free_tx.send(vec![0u8; (MAX_RUN_PAGES as u64 * PAGE_SIZE) as usize]);
        }
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("placer".into())
            .spawn(move || place_jobs(own, jobs, free_tx, flag))
            .map_err(|err| DestError::Spawn {
                thread: "placer",
                err,
            })?;
        Ok(Placer {
            jobs: Some(jobs_tx),
            free,
            spare: Vec::new(),
            failed,
            thread: Some(thread),
            inline: None,
        })
    }

    /// From now on (`true`) the reader places every job itself as it submits it, or hands
    /// them to the thread again (`false`). The caller flushed: no job is queued.
    ///
    /// Two threads pay only with a core for each: once the VM runs here, its vCPUs compete
    /// for the same cores, and on a host with no core to spare the handing over (a wake-up
    /// each way per run, the run's data read on another core) cost a busy guest's migration
    /// more than the overlap saved.
    pub(super) fn place_inline(&mut self, placement: Option<Placement>) {
        self.inline = placement;
    }

    /// Reads `len` bytes of a run with `read` into a free buffer, waiting for one if all are
    /// in use. A buffer whose read failed stays with the placer.
    pub(super) fn read_run(
        &mut self,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), DestError>,
    ) -> Result<Vec<u8>, DestError> {
        let mut buf = match self.spare.pop() {
            Some(b) => b,
            None => self.free.recv().map_err(|_| DestError::PlacerLost)?,
        };
        match read(&mut buf[..len]) {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.spare.push(buf);
                Err(e)
            }
        }
    }

    /// Queues `job`, and reports a failure of an earlier one.
    pub(super) fn submit(&mut self, job: Job) -> Result<(), DestError> {
        if let Some(placement) = self.inline.as_ref() {
            let (result, buf) = apply(placement, job);
            self.spare.extend(buf);
            return result;
        }
        let jobs = self.jobs.as_ref().ok_or(DestError::PlacerLost)?;
        jobs.send(Request::Job(job))
            .map_err(|_| DestError::PlacerLost)?;
        if self.failed.load(Ordering::Acquire) {
            return self.flush();
        }
        Ok(())
    }

    /// Waits until every job queued is done; the first failure among them, if any.
    pub(super) fn flush(&mut self) -> Result<(), DestError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or(DestError::PlacerLost)?
            .send(Request::Flush(tx))
            .map_err(|_| DestError::PlacerLost)?;
        match rx.recv() {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err(DestError::PlacerLost),
        }
    }
}

impl Drop for Placer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: applies jobs until the reader is gone. After a failure it skips the jobs up to
/// the next flush, returning their buffers, so that the reader never waits for a buffer.
fn place_jobs(
    placement: Placement,
    requests: Receiver<Request>,
    free: Sender<Vec<u8>>,
    failed: Arc<AtomicBool>,
) {
    let mut error: Option<DestError> = None;
    let mut lowered = false;
    for request in requests {
        match request {
            Request::Flush(reply) => {
                failed.store(false, Ordering::Release);
                let _ = reply.send(error.take());
            }
            Request::Job(Job::Pages { buf, .. }) if error.is_some() => {
                let _ = free.send(buf);
            }
            Request::Job(_) if error.is_some() => {}
            Request::Job(job) => {
                if matches!(job, Job::Pages { running: true, .. }) && !lowered {
                    // Background pages of a running VM: the fault and urgent-channel threads
                    // keep the normal priority.
                    lower_priority();
                    lowered = true;
                }
                let (result, buf) = apply(&placement, job);
                if let Some(buf) = buf {
                    let _ = free.send(buf);
                }
                if let Err(e) = result {
                    error = Some(e);
                    failed.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// Applies one job; the buffer it held, to be used again.
fn apply(placement: &Placement, job: Job) -> (Result<(), DestError>, Option<Vec<u8>>) {
    match job {
        Job::Pages {
            run,
            off,
            buf,
            running,
        } => {
            let r = placement.pages(run, off, &buf[..run.data_len()], running);
            (r, Some(buf))
        }
        Job::Zero {
            block,
            first,
            count,
            running,
        } => (placement.zero(block, first, count, running), None),
        Job::Discard { block, ranges } => (placement.discard(block, &ranges), None),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use std::fs::File;

    use crate::dest::pages::PageState;
    use crate::dest::place::tests::{dest, first_bytes};
    use crate::dest::Dest;

    /// A run of `count` pages at `first` of block 0, every byte `byte`, read into a buffer of
    /// `placer`.
    fn pages(placer: &mut Placer, first: u64, count: u32, byte: u8, running: bool) -> Job {
        let run = PageRun {
            block: 0,
            first,
            count,
        };
        let buf = placer
            .read_run(run.data_len(), |b| {
                b.fill(byte);
                Ok(())
            })
            .unwrap();
        Job::Pages {
            run,
            off: first * PAGE_SIZE,
            buf,
            running,
        }
    }

    /// A zero run of `count` pages at `first` of block 0.
    fn zeros(first: u64, count: u64, running: bool) -> Job {
        Job::Zero {
            block: 0,
            first,
            count,
            running,
        }
    }

    /// Runs `f` with a destination of `pages` pages and its placer, on a thread, and fails the
    /// test if it takes longer than 10 s: a placer that kept a buffer would leave the reader
    /// waiting for ever.
    fn bounded(pages: u64, f: impl FnOnce(&Dest, &File, &mut Placer) + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (d, file, _vmm) = dest(pages);
            let mut placer = Placer::start(d.placement()).unwrap();
            f(&d, &file, &mut placer);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the placer did not finish within 10 s");
    }

    #[test]
    fn jobs_apply_in_the_order_they_came() {
        bounded(8, |d, file, placer| {
            // Pages, then a zero run over two of them, then a discard of one, then pages again
            // over the discarded one: only the order says what each page holds.
            let job = pages(placer, 0, 4, 9, false);
            placer.submit(job).unwrap();
            placer.submit(zeros(1, 2, false)).unwrap();
            let discard = Job::Discard {
                block: 0,
                ranges: vec![(3, 1), (5, 1)],
            };
            placer.submit(discard).unwrap();
            let job = pages(placer, 3, 1, 7, false);
            placer.submit(job).unwrap();
            placer.flush().unwrap();
            assert_eq!(first_bytes(file, 8), [9, 0, 0, 7, 5, 0, 7, 8]);
            assert_eq!(d.pages.get(0, 1), PageState::Zero);
            assert_eq!(d.pages.get(0, 3), PageState::Present);
            assert_eq!(d.pages.get(0, 5), PageState::Missing);
        });
    }

    #[test]
    fn a_failure_is_reported_and_the_reader_never_waits_for_a_buffer() {
        bounded(8, |_, file, placer| {
            // No userfaultfd: pages for a running VM cannot be placed.
            let job = pages(placer, 0, 1, 9, true);
            let jobs = placer.jobs.clone().unwrap();
            jobs.send(Request::Job(job)).unwrap();
            // More runs than buffers queued behind the failure before it is reported: each
            // skipped run's buffer comes back, or this waits for ever.
            for i in 0..(BUFFERS as u64 * 3) {
                let job = pages(placer, i % 8, 1, 3, false);
                jobs.send(Request::Job(job)).unwrap();
            }
            let e = placer.flush().unwrap_err();
            assert!(e.to_string().contains("without a userfaultfd"), "{e}");
            assert_eq!(first_bytes(file, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
            // Reported once; the placer goes on.
            for i in 0..(BUFFERS as u64 * 3) {
                let job = pages(placer, i % 8, 1, 3, false);
                placer.submit(job).unwrap();
            }
            placer.flush().unwrap();
            assert_eq!(first_bytes(file, 8), [3; 8]);
        });
    }

    #[test]
    fn jobs_after_a_failure_are_skipped_until_it_is_reported() {
        bounded(4, |_, file, placer| {
            let failing = pages(placer, 0, 1, 9, true);
            let after = pages(placer, 1, 1, 6, false);
            // Both are queued before the failure can be seen; the second is not applied.
            let jobs = placer.jobs.clone().unwrap();
            jobs.send(Request::Job(failing)).unwrap();
            jobs.send(Request::Job(after)).unwrap();
            assert!(placer.flush().is_err());
            assert_eq!(first_bytes(file, 4), [1, 2, 3, 4]);
        });
    }

    #[test]
    fn a_buffer_whose_read_failed_is_kept() {
        bounded(4, |_, _, placer| {
            // More failed reads than buffers: each one's buffer is used again.
            for _ in 0..(BUFFERS * 2) {
                let r = placer.read_run(PAGE_SIZE as usize, |_| Err(DestError::PeerClosed));
                assert!(matches!(r, Err(DestError::PeerClosed)));
            }
            let job = pages(placer, 0, 1, 5, false);
            placer.submit(job).unwrap();
            placer.flush().unwrap();
        });
    }

    #[test]
    fn inline_jobs_are_applied_as_they_are_submitted() {
        bounded(4, |d, file, placer| {
            placer.place_inline(Some(d.placement()));
            // More runs than buffers, each in RAM as soon as it is submitted.
            for i in 0..(BUFFERS as u64 * 2) {
                let job = pages(placer, i % 4, 1, 7 + i as u8, false);
                placer.submit(job).unwrap();
                let mut b = [0u8; 1];
                std::os::unix::fs::FileExt::read_exact_at(file, &mut b, (i % 4) * PAGE_SIZE)
                    .unwrap();
                assert_eq!(b[0], 7 + i as u8);
            }
            let job = pages(placer, 0, 1, 9, true);
            let e = placer.submit(job).unwrap_err();
            assert!(e.to_string().contains("without a userfaultfd"), "{e}");
            placer.place_inline(None);
            let job = pages(placer, 0, 1, 2, false);
            placer.submit(job).unwrap();
            placer.flush().unwrap();
            assert_eq!(first_bytes(file, 4)[0], 2);
        });
    }

    #[test]
    fn pages_for_a_running_vm_go_in_with_uffdio_copy_and_wake_its_fault() {
        use crate::dest::fault::tests::{registered_ram, serving, touch, PAGES};
        use std::os::fd::AsFd;

        let Some((file, ptr, fh)) = registered_ram() else {
            return;
        };
        let blocks = vec![proto::local::LocalBlock {
            desc: proto::BlockDesc {
                name: "ram".into(),
                guest_addr: 0,
                size: PAGES * PAGE_SIZE,
            },
            memfd_offset: 0,
            host_addr: ptr as u64,
        }];
        let fd = file.as_fd().try_clone_to_owned().unwrap();
        let mem = Arc::new(crate::mapping::GuestMapping::new(fd, blocks).unwrap());
        let (fh, requests, server) = serving(fh);
        let placement = Placement::new(mem, fh.pages().clone(), Some(fh.clone()));
        let mut placer = Placer::start(placement).unwrap();
        let wait = Duration::from_secs(10);

        // A vCPU waits for page 5 and for page 9; background pages and a zero run come
        // through the placing thread, as on a host with cores to spare.
        let five = touch(ptr, 5);
        let nine = touch(ptr, 9);
        let mut asked = Vec::new();
        while asked.len() < 2 {
            let runs = requests.recv_timeout(wait).expect("no request");
            asked.extend(runs.iter().map(|r| r.first));
        }
        let job = pages(&mut placer, 4, 4, 0x5a, true);
        placer.submit(job).unwrap();
        placer.submit(zeros(8, 4, true)).unwrap();
        placer.flush().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((five.join(), nine.join()));
        });
        let (five, nine) = rx.recv_timeout(wait).expect("a fault was never woken");
        assert_eq!(five.unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(nine.unwrap(), 0);
        assert_eq!(fh.pages().get(0, 4), PageState::Present);
        assert_eq!(
            fh.pages().get(0, 9),
            PageState::Present,
            "requested: placed as zeros"
        );
        assert_eq!(
            fh.pages().get(0, 10),
            PageState::Zero,
            "not requested: left to the kernel"
        );
        fh.stop();
        drop(placer);
        let _ = server.join();
    }
}
