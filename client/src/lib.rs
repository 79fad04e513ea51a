//! `umem-client`: the VMM side of umemd's local protocol.
//!
//! A VMM whose guest RAM lives in a memfd hands that RAM to its host's `umemd` and answers it
//! during a migration: dirty bitmaps and the machine state on the source, loading the machine
//! state on the destination. This crate knows the socket, the file descriptors and the
//! messages ([`proto::local::LocalMessage`]); it knows nothing of KVM. The VMM plugs in through
//! two small traits, [`MigrationSource`] and [`MigrationTarget`], and learns what happens
//! through [`Event`]s.
//!
//! - Source: [`UmemdClient::outgoing`] sends `Outgoing` with the memfd attached, then
//!   [`OutgoingSession::run`] answers every `Harvest` with dirty bitmaps (all ones the first
//!   time) and `BitmapEnd`; on the final harvest (`stop`) it stops the vCPUs first and sends the
//!   machine state after the bitmaps. [`Event::Committed`] means the destination may run the VM
//!   from then on: the VMM must never resume its copy by itself after it.
//! - Destination: [`UmemdClient::incoming`] sends `Incoming` with the memfd and the
//!   userfaultfd attached, then [`IncomingSession::run`] loads the machine state when it arrives
//!   (without running it), answers `StateLoaded`, and runs the vCPUs only on `Run`.
//!
//! `docs/INTEGRATION.md` in the repository says what a VMM must provide and what to do when a
//! migration fails.
//!
//! # Example
//!
//! ```no_run
//! use std::fs::File;
//! use std::os::fd::{AsFd, OwnedFd};
//! use std::sync::Mutex;
//!
//! use umem_client::{
//!     BoxError, ClientError, Event, LocalBlock, MigrationParams, MigrationSource,
//!     MigrationTarget, UmemdClient,
//! };
//!
//! /// The VMM's view of its VM (KVM, devices, ...), reduced to what a migration needs.
//! struct MyVm {
//!     /// Guest RAM: a sealed memfd, mapped MAP_SHARED, laid out as `blocks`.
//!     memfd: File,
//!     blocks: Vec<LocalBlock>,
//!     /// Destination: the userfaultfd over guest RAM, kept until every page is present.
//!     uffd: Mutex<Option<OwnedFd>>,
//! }
//!
//! impl MigrationSource for MyVm {
//!     fn stop_vcpus(&self) -> Result<(), BoxError> {
//!         // Pause every vCPU and return once none is inside KVM_RUN.
//!         Ok(())
//!     }
//!     fn dirty_bitmap(&self, block: usize) -> Result<Vec<u64>, BoxError> {
//!         // KVM_GET_DIRTY_LOG of the block's memory slot (which also clears it).
//!         let pages = self.blocks[block].desc.pages() as usize;
//!         Ok(vec![0; pages.div_ceil(64)])
//!     }
//!     fn save_state(&self) -> Result<Vec<u8>, BoxError> {
//!         // vCPU registers, irqchip, clock, device models, as one blob.
//!         Ok(Vec::new())
//!     }
//! }
//!
//! impl MigrationTarget for MyVm {
//!     fn load_state(&self, _blob: &[u8]) -> Result<(), BoxError> {
//!         // Restore every vCPU and device; do NOT run them yet.
//!         Ok(())
//!     }
//!     fn run(&self, postcopy: bool) {
//!         if !postcopy {
//!             // Every page is present: unregister RAM from the userfaultfd and close it.
//!             self.uffd.lock().unwrap().take();
//!         }
//!         // Resume the vCPUs (or stay paused if the operator asked to wait).
//!     }
//! }
//!
//! /// Source: migrate the running VM to the umemd listening at `uri`.
//! fn migrate_out(vm: &MyVm, uri: &str) -> Result<(), ClientError> {
//!     // Dirty logging is on, and its bitmaps emptied, before this point.
//!     let client = UmemdClient::connect("/run/umemd.sock")?;
//!     let mut session = client.outgoing(
//!         "vm0",
//!         uri,
//!         MigrationParams::default(),
//!         vm.blocks.clone(),
//!         vm.memfd.as_fd(),
//!     )?;
//!     // Cancel, SetParams and StartPostcopy go through a handle other threads may hold.
//!     let control = session.control();
//!     std::thread::spawn(move || control.start_postcopy());
//!     let result = session.run(vm, |event| match event {
//!         Event::Progress(s) => println!("round {}, {} pages sent", s.rounds, s.pages_sent),
//!         Event::Committed => println!("committed: the VM is the destination's now"),
//!         _ => {}
//!     });
//!     if result.is_err() && !session.committed() {
//!         // Not committed: the destination never ran the VM; resume it here.
//!     }
//!     // Committed (success or not): never resume this copy by itself.
//!     result.map(|_| ())
//! }
//!
//! /// Destination: receive a VM on `uri` into this (not yet started) VM.
//! fn migrate_in(vm: &MyVm, uri: &str) -> Result<(), ClientError> {
//!     let client = UmemdClient::connect("/run/umemd.sock")?;
//!     let uffd = vm.uffd.lock().unwrap();
//!     let mut session = client.incoming(
//!         "vm0",
//!         uri,
//!         vm.blocks.clone(),
//!         vm.memfd.as_fd(),
//!         uffd.as_ref().map(|u| u.as_fd()),
//!     )?;
//!     drop(uffd);
//!     session.vcpu_threads(vec![/* host thread id of each vCPU */])?;
//!     let result = session.run(vm, |event| {
//!         if let Event::Completed(_) = event {
//!             // Every page is present: the VM is an ordinary VM now.
//!             vm.uffd.lock().unwrap().take();
//!         }
//!     });
//!     if result.is_err() && session.postcopy() {
//!         // Pages are missing: stop the vCPUs (postcopy-paused) and keep the userfaultfd.
//!     }
//!     result.map(|_| ())
//! }
//! ```
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::info;
use proto::frame;
use proto::local::{LocalMessage, PeerAuth, MAX_BITMAP_WORDS};
use sendfd::SendWithFd;

pub use proto::local::LocalBlock;
pub use proto::{BlockDesc, FrameError, MigrationParams, MigrationStats, PostcopyStats};

/// An error of the VMM's own (stopping vCPUs, saving or loading the machine state).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a VMM's connection to umemd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// umemd could not be reached.
    #[error("connecting to umemd at {path}: {err}{}", connect_hint(err))]
    Connect {
        /// Socket path.
        path: String,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// The connection failed.
    #[error("umemd connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be read or decoded.
    #[error("umemd connection: {0}")]
    Frame(#[from] FrameError),
    /// umemd sent something out of place.
    #[error("unexpected message from umemd: {0}")]
    Unexpected(String),
    /// umemd reported that the migration failed (its `Failed` message).
    #[error("{0}")]
    Refused(String),
    /// umemd closed the connection.
    #[error("umemd closed the connection (did it exit?)")]
    UmemdLost,
    /// The VMM could not do what umemd asked (stop, save or load).
    #[error("{0}")]
    Vm(BoxError),
}

/// What the VMM gives a source session: the rest is in the memfd.
pub trait MigrationSource {
    /// Stops every vCPU and returns once none runs (the final harvest follows).
    fn stop_vcpus(&self) -> Result<(), BoxError>;
    /// The dirty pages of block `block` (index in the layout given to
    /// [`UmemdClient::outgoing`]) since the last call, one bit per page, clearing them.
    fn dirty_bitmap(&self, block: usize) -> Result<Vec<u64>, BoxError>;
    /// The machine state (everything but RAM) as one blob, vCPUs stopped.
    fn save_state(&self) -> Result<Vec<u8>, BoxError>;
}

/// What the VMM gives a destination session.
pub trait MigrationTarget {
    /// Loads the machine state blob into the (not running) VM. It must not run it.
    fn load_state(&self, blob: &[u8]) -> Result<(), BoxError>;
    /// The source committed: the VM may run now. `postcopy` says pages are still missing, so
    /// the userfaultfd must stay registered until [`Event::Completed`]; without postcopy every
    /// page is present already and the userfaultfd may be released.
    fn run(&self, postcopy: bool);
}

/// What umemd reported, as a session's `run` passes it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Destination: umemd listens on this address (`tcp:HOST:PORT`).
    Listening(String),
    /// Statistics so far.
    Progress(MigrationStats),
    /// Postcopy statistics so far (boxed: they are several times the size of any other event).
    PostcopyProgress(Box<PostcopyStats>),
    /// Destination: the machine state that follows starts a postcopy phase.
    PostcopyBegin,
    /// Source: umemd asked for the final harvest; the vCPUs are about to stop.
    Stopping,
    /// Destination: the machine state is loaded (not running) and umemd was told so.
    StateLoaded,
    /// Source: the switchover is committed. The destination may run the VM from now on: this
    /// copy must never be resumed by the VMM itself, whatever happens to the migration.
    Committed,
    /// Destination: the VM was told to run ([`MigrationTarget::run`] was called).
    Running {
        /// Pages are still missing (postcopy).
        postcopy: bool,
    },
    /// Postcopy lost its link for this reason; umemd waits for a new connection (the
    /// destination VM keeps running on the pages it has). A `Progress` in phase `postcopy`
    /// says when it resumed.
    PostcopyPaused(String),
    /// The migration's session id: what a umemd started again is told to go on with
    /// ([`UmemdClient::resume_incoming`]).
    Session(u64),
    /// The migration completed (`run` returns these statistics next).
    Completed(MigrationStats),
    /// umemd reported a failure (`run` returns [`ClientError::Refused`] next).
    Failed {
        /// What went wrong.
        message: String,
        /// Statistics up to the failure.
        stats: MigrationStats,
    },
}

/// What a session does with a message from umemd.
enum Report {
    /// A report both roles pass on to `on_event` as it is.
    Passed,
    /// The migration ended (and `on_event` heard how).
    End(Result<MigrationStats, ClientError>),
    /// A message for the role itself to handle (boxed: the largest message would otherwise
    /// size every report).
    Own(Box<LocalMessage>),
}

/// Handles the messages both roles receive alike: progress, postcopy statistics and pauses,
/// the session id, and the end of the migration.
fn report(msg: LocalMessage, on_event: &mut impl FnMut(Event)) -> Report {
    match msg {
        LocalMessage::Progress(stats) => on_event(Event::Progress(stats)),
        LocalMessage::PostcopyProgress(p) => on_event(Event::PostcopyProgress(Box::new(p))),
        LocalMessage::PostcopyPaused { reason } => on_event(Event::PostcopyPaused(reason)),
        LocalMessage::Session(id) => on_event(Event::Session(id)),
        LocalMessage::Completed(stats) => {
            on_event(Event::Completed(stats));
            return Report::End(Ok(stats));
        }
        LocalMessage::Failed { message, stats } => {
            on_event(Event::Failed {
                message: message.clone(),
                stats,
            });
            return Report::End(Err(ClientError::Refused(message)));
        }
        other => return Report::Own(Box::new(other)),
    }
    Report::Passed
}

/// The sending half of a connection, shared by a session and its control handles so that
/// frames from different threads never interleave.
type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, msg: &LocalMessage) -> Result<(), ClientError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    let mut conn = w.lock().unwrap_or_else(|p| p.into_inner());
    conn.write_all(&buf)?;
    Ok(())
}

fn recv(conn: &mut UnixStream, body: &mut Vec<u8>) -> Result<LocalMessage, ClientError> {
    let p = frame::read(conn, body).map_err(|e| {
        if e.is_eof() {
            ClientError::UmemdLost
        } else {
            e.into()
        }
    })?;
    LocalMessage::decode(p.kind, body).map_err(|e| ClientError::Frame(e.into()))
}

/// What to do about a socket nobody answers on, or one this user may not use.
fn connect_hint(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (is umemd running? start it with `umemd --socket PATH`, or `systemctl enable --now umemd.socket`)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (umemd serves root and the users it allows: run as root, or start umemd with --allow-uid/--allow-gid)"
        }
        _ => "",
    }
}

/// A connection to umemd, before the migration request that opens it.
#[derive(Debug)]
pub struct UmemdClient {
    conn: UnixStream,
    auth: PeerAuth,
}

impl UmemdClient {
    /// Connects to umemd's socket at `path`. Each migration uses its own connection.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let conn = UnixStream::connect(path).map_err(|err| ClientError::Connect {
            path: path.display().to_string(),
            err,
        })?;
        Ok(UmemdClient {
            conn,
            auth: PeerAuth::default(),
        })
    }

    /// Uses an already connected stream (an inherited socket, or a test's stub).
    pub fn from_stream(conn: UnixStream) -> Self {
        UmemdClient {
            conn,
            auth: PeerAuth::default(),
        }
    }

    /// How the migration's peer connections authenticate: the secret both hosts were given
    /// for it (without one, umemd uses its host key file if it has one), and whether a
    /// non-loopback address may go without any secret. Applies to the request that follows.
    pub fn with_auth(mut self, auth: PeerAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Sends the opening frame with `fds` attached in the same `sendmsg`, and splits the
    /// connection into its reading and writing halves.
    fn open(self, msg: &LocalMessage, fds: &[RawFd]) -> Result<(UnixStream, Writer), ClientError> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        let sent = self.conn.send_with_fd(&buf, fds).and_then(|n| {
            if n < buf.len() {
                (&self.conn).write_all(&buf[n..])?;
            }
            Ok(())
        });
        if let Err(e) = sent {
            // umemd may refuse a client as soon as it connects (not allowed, too many
            // sessions) and close: its reason is waiting to be read, and says more than EPIPE.
            return Err(self.refusal().unwrap_or(ClientError::Io(e)));
        }
        let writer = Arc::new(Mutex::new(self.conn.try_clone()?));
        Ok((self.conn, writer))
    }

    /// The `Failed` umemd sent before closing, if it did.
    fn refusal(&self) -> Option<ClientError> {
        self.conn
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .ok()?;
        let mut conn = self.conn.try_clone().ok()?;
        let mut body = Vec::new();
        match recv(&mut conn, &mut body) {
            Ok(LocalMessage::Failed { message, .. }) => Some(ClientError::Refused(message)),
            _ => None,
        }
    }

    /// Source: asks umemd to migrate the VM `vm` out to `uri` (`tcp:HOST:PORT`), handing it
    /// `memfd`, which holds guest RAM laid out as `blocks`. The VMM's dirty logging must be on
    /// (and cleared) before this call: every page written from now on must be seen dirty.
    pub fn outgoing(
        self,
        vm: &str,
        uri: &str,
        params: MigrationParams,
        blocks: Vec<LocalBlock>,
        memfd: BorrowedFd<'_>,
    ) -> Result<OutgoingSession, ClientError> {
        let msg = LocalMessage::Outgoing {
            vm: vm.to_string(),
            uri: uri.to_string(),
            params,
            blocks: blocks.clone(),
            auth: self.auth.clone(),
        };
        let (reader, writer) = self.open(&msg, &[memfd.as_raw_fd()])?;
        Ok(OutgoingSession {
            reader,
            writer,
            blocks,
            body: Vec::new(),
            first_harvest: true,
            committed: false,
        })
    }

    /// Destination: asks umemd to receive the VM `vm` on `uri` (`tcp:HOST:PORT`, port 0 picks
    /// one), handing it `memfd` (guest RAM laid out as `blocks`) and, for postcopy, `uffd`: a
    /// userfaultfd with every block registered in MISSING mode, not user-mode-only. The VMM
    /// keeps its own copy of `uffd` open until [`Event::Completed`].
    pub fn incoming(
        self,
        vm: &str,
        uri: &str,
        blocks: Vec<LocalBlock>,
        memfd: BorrowedFd<'_>,
        uffd: Option<BorrowedFd<'_>>,
    ) -> Result<IncomingSession, ClientError> {
        let msg = LocalMessage::Incoming {
            vm: vm.to_string(),
            uri: uri.to_string(),
            blocks,
            has_uffd: uffd.is_some(),
            auth: self.auth.clone(),
        };
        let mut fds = vec![memfd.as_raw_fd()];
        fds.extend(uffd.map(|u| u.as_raw_fd()));
        let (reader, writer) = self.open(&msg, &fds)?;
        Ok(IncomingSession {
            reader,
            writer,
            body: Vec::new(),
            postcopy: false,
            state_loaded: false,
        })
    }
}

impl UmemdClient {
    /// To a umemd started again after the one serving this source died: go on with postcopy
    /// session `session_id` (its id came as [`Event::Session`]), whose VM runs on the
    /// destination at `uri`. The memfd rides along; nothing else is asked of the VM.
    pub fn resume_outgoing(
        self,
        vm: &str,
        uri: &str,
        params: MigrationParams,
        blocks: Vec<LocalBlock>,
        memfd: BorrowedFd<'_>,
        session_id: u64,
    ) -> Result<OutgoingSession, ClientError> {
        let msg = LocalMessage::ResumeOutgoing {
            vm: vm.to_string(),
            uri: uri.to_string(),
            params,
            blocks: blocks.clone(),
            session_id,
            auth: self.auth.clone(),
        };
        let (reader, writer) = self.open(&msg, &[memfd.as_raw_fd()])?;
        Ok(OutgoingSession {
            reader,
            writer,
            blocks,
            body: Vec::new(),
            first_harvest: false,
            // The switchover was committed long ago.
            committed: true,
        })
    }

    /// To a umemd started again after the one serving this destination died: go on with
    /// postcopy session `session_id` (its id came as [`Event::Session`]), whose VM runs here
    /// with pages still missing, listening on `uri` (where the old umemd listened) for the
    /// source to come back. The same memfd and userfaultfd ride along.
    pub fn resume_incoming(
        self,
        vm: &str,
        uri: &str,
        blocks: Vec<LocalBlock>,
        memfd: BorrowedFd<'_>,
        uffd: BorrowedFd<'_>,
        session_id: u64,
    ) -> Result<IncomingSession, ClientError> {
        let msg = LocalMessage::ResumeIncoming {
            vm: vm.to_string(),
            uri: uri.to_string(),
            blocks,
            session_id,
            auth: self.auth.clone(),
        };
        let (reader, writer) = self.open(&msg, &[memfd.as_raw_fd(), uffd.as_raw_fd()])?;
        Ok(IncomingSession {
            reader,
            writer,
            body: Vec::new(),
            // The VM runs already, in postcopy.
            postcopy: true,
            state_loaded: true,
        })
    }
}

/// A handle on a running outgoing migration, for other threads (a control API): cheap to
/// clone, usable while [`OutgoingSession::run`] runs.
#[derive(Debug, Clone)]
pub struct OutgoingControl {
    writer: Writer,
}

impl OutgoingControl {
    /// Asks umemd to cancel the migration. After [`Event::Committed`] the VM is the
    /// destination's: cancelling then changes nothing for this copy.
    pub fn cancel(&self) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::Cancel)
    }

    /// New tunables for the running migration.
    pub fn set_params(&self, params: MigrationParams) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::SetParams(params))
    }

    /// Asks umemd to switch the running precopy to postcopy now.
    pub fn start_postcopy(&self) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::StartPostcopy)
    }

    /// Cuts a running postcopy's link on purpose; umemd pauses and connects again only after
    /// [`Self::resume`].
    pub fn pause(&self) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::Pause)
    }

    /// Lets a paused postcopy connect again, to `uri` from now on.
    pub fn resume(&self, uri: &str) -> Result<(), ClientError> {
        send(
            &self.writer,
            &LocalMessage::Resume {
                uri: uri.to_string(),
            },
        )
    }
}

/// A handle on a running incoming migration, for other threads (a control API).
#[derive(Debug, Clone)]
pub struct IncomingControl {
    writer: Writer,
}

impl IncomingControl {
    /// Ends the incoming migration before the VM ran here (umemd refuses once it runs).
    pub fn cancel(&self) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::Cancel)
    }

    /// While postcopy is paused, listens for the source on `uri` instead; the new address comes
    /// back as [`Event::Listening`].
    pub fn recover(&self, uri: &str) -> Result<(), ClientError> {
        send(
            &self.writer,
            &LocalMessage::Recover {
                uri: uri.to_string(),
            },
        )
    }
}

/// The source side of one migration, from the `Outgoing` request to its end.
#[derive(Debug)]
pub struct OutgoingSession {
    reader: UnixStream,
    writer: Writer,
    blocks: Vec<LocalBlock>,
    body: Vec<u8>,
    first_harvest: bool,
    committed: bool,
}

impl OutgoingSession {
    /// A handle that sends `Cancel`, `SetParams` and `StartPostcopy` from other threads.
    pub fn control(&self) -> OutgoingControl {
        OutgoingControl {
            writer: self.writer.clone(),
        }
    }

    /// Whether umemd reported the switchover committed: if so, the VM must not be resumed
    /// here by the VMM itself, even when `run` returns an error.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// Answers umemd until the migration ends: `Ok` with the final statistics once it
    /// completed, an error otherwise (umemd's `Failed` becomes [`ClientError::Refused`], a
    /// closed connection [`ClientError::UmemdLost`]). Every report goes to `on_event` first.
    pub fn run(
        &mut self,
        vm: &impl MigrationSource,
        mut on_event: impl FnMut(Event),
    ) -> Result<MigrationStats, ClientError> {
        loop {
            let msg = match report(recv(&mut self.reader, &mut self.body)?, &mut on_event) {
                Report::Own(msg) => *msg,
                Report::Passed => continue,
                Report::End(Ok(stats)) => {
                    info!(
                        "migration completed: {} pages sent, downtime {} us",
                        stats.pages_sent, stats.downtime_us
                    );
                    return Ok(stats);
                }
                Report::End(Err(e)) => return Err(e),
            };
            match msg {
                LocalMessage::Harvest { stop } => self.harvest(vm, stop, &mut on_event)?,
                LocalMessage::Committed => {
                    self.committed = true;
                    info!("switchover committed: the VM moves to the destination");
                    on_event(Event::Committed);
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// One harvest: (stop,) bitmaps, `BitmapEnd`, (machine state).
    fn harvest(
        &mut self,
        vm: &impl MigrationSource,
        stop: bool,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), ClientError> {
        let t0 = Instant::now();
        if stop {
            on_event(Event::Stopping);
            vm.stop_vcpus().map_err(ClientError::Vm)?;
        }
        let paused = t0.elapsed();
        for (index, block) in self.blocks.iter().enumerate() {
            let words = if self.first_harvest {
                all_pages(block.desc.pages())
            } else {
                vm.dirty_bitmap(index).map_err(ClientError::Vm)?
            };
            for (i, chunk) in words.chunks(MAX_BITMAP_WORDS).enumerate() {
                if chunk.iter().all(|&w| w == 0) {
                    continue;
                }
                let msg = LocalMessage::DirtyBitmap {
                    block: index as u32,
                    first_page: (i * MAX_BITMAP_WORDS * 64) as u64,
                    words: chunk.to_vec(),
                };
                send(&self.writer, &msg)?;
            }
        }
        self.first_harvest = false;
        send(&self.writer, &LocalMessage::BitmapEnd { stopped: stop })?;
        let harvested = t0.elapsed();
        if stop {
            let state = vm.save_state().map_err(ClientError::Vm)?;
            info!(
                "switchover: vCPUs stopped in {} us, dirty log after {} us, machine state ({} bytes) after {} us",
                paused.as_micros(),
                harvested.as_micros(),
                state.len(),
                t0.elapsed().as_micros()
            );
            send(&self.writer, &LocalMessage::MachineState(state))?;
        }
        Ok(())
    }
}

/// A bitmap with the first `pages` bits set.
fn all_pages(pages: u64) -> Vec<u64> {
    let mut w = vec![u64::MAX; pages.div_ceil(64) as usize];
    if !pages.is_multiple_of(64) {
        if let Some(last) = w.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    w
}

/// The destination side of one migration, from the `Incoming` request to its end.
#[derive(Debug)]
pub struct IncomingSession {
    reader: UnixStream,
    writer: Writer,
    body: Vec<u8>,
    postcopy: bool,
    state_loaded: bool,
}

impl IncomingSession {
    /// Tells umemd the host thread ids of the vCPUs, by vCPU index, so that it can tell
    /// blocked time per vCPU during postcopy.
    pub fn vcpu_threads(&self, tids: Vec<u32>) -> Result<(), ClientError> {
        send(&self.writer, &LocalMessage::VcpuThreads(tids))
    }

    /// Waits (up to `timeout`) for umemd to listen, and returns the address it listens on
    /// (the port it picked, if it was asked for port 0). A refusal (the address is in use, the
    /// RAM is already in a migration, a bad layout) is [`ClientError::Refused`]. Call it before
    /// [`Self::run`], which otherwise reports the address as [`Event::Listening`].
    pub fn wait_listening(&mut self, timeout: std::time::Duration) -> Result<String, ClientError> {
        self.reader.set_read_timeout(Some(timeout))?;
        let first = recv(&mut self.reader, &mut self.body);
        self.reader.set_read_timeout(None)?;
        match first? {
            LocalMessage::Listening { uri } => {
                info!("waiting for the migration on {uri}");
                Ok(uri)
            }
            LocalMessage::Failed { message, .. } => Err(ClientError::Refused(message)),
            other => Err(ClientError::Unexpected(format!(
                "expected Listening, got {other:?}"
            ))),
        }
    }

    /// A handle for other threads, to steer the session while [`Self::run`] runs.
    pub fn control(&self) -> IncomingControl {
        IncomingControl {
            writer: self.writer.clone(),
        }
    }

    /// Whether umemd announced a postcopy phase: if so, once the VM runs, pages are missing
    /// until [`Event::Completed`], and a failure must stop the VM (postcopy-paused) rather
    /// than let it run on, keeping the userfaultfd registered.
    pub fn postcopy(&self) -> bool {
        self.postcopy
    }

    /// Answers umemd until the migration ends: loads the machine state when it arrives (not
    /// running it) and answers `StateLoaded`; calls [`MigrationTarget::run`] on `Run`. `Ok` with
    /// the final statistics once every page is present; an error otherwise (a state that does
    /// not load is reported to umemd as `Failed` and returned as [`ClientError::Vm`]).
    pub fn run(
        &mut self,
        vm: &impl MigrationTarget,
        mut on_event: impl FnMut(Event),
    ) -> Result<MigrationStats, ClientError> {
        loop {
            let msg = match report(recv(&mut self.reader, &mut self.body)?, &mut on_event) {
                Report::Own(msg) => *msg,
                Report::Passed => continue,
                Report::End(Ok(stats)) => {
                    info!("incoming migration completed");
                    return Ok(stats);
                }
                Report::End(Err(e)) => return Err(e),
            };
            match msg {
                LocalMessage::PostcopyBegin => {
                    self.postcopy = true;
                    on_event(Event::PostcopyBegin);
                }
                LocalMessage::Listening { uri } => {
                    info!("waiting for the migration on {uri}");
                    on_event(Event::Listening(uri));
                }
                LocalMessage::MachineState(blob) => {
                    if let Err(e) = vm.load_state(&blob) {
                        let _ = send(
                            &self.writer,
                            &LocalMessage::Failed {
                                message: e.to_string(),
                                stats: Default::default(),
                            },
                        );
                        return Err(ClientError::Vm(e));
                    }
                    // Loaded, not run: the VM runs only once the source has committed (`Run`).
                    self.state_loaded = true;
                    send(&self.writer, &LocalMessage::StateLoaded)?;
                    on_event(Event::StateLoaded);
                }
                LocalMessage::Run if self.state_loaded => {
                    vm.run(self.postcopy);
                    on_event(Event::Running {
                        postcopy: self.postcopy,
                    });
                }
                other => {
                    log::warn!("unexpected message from umemd: {other:?}");
                    return Err(ClientError::Unexpected(format!("{other:?}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
