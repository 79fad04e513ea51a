//! Messages between a `vmm` and its host's `umemd` over a Unix socket.
//!
//! Each migration uses its own connection. The VMM opens it with `Outgoing` (source) or
//! `Incoming` (destination), passing its guest-RAM memfd (and, for postcopy, its userfaultfd)
//! beside that first frame with `SCM_RIGHTS`.

use crate::auth::Secret;
use crate::frame;
use crate::types::{
    BlockDesc, MigrationParams, MigrationStats, PostcopyStats, MAX_BLOCKS, MAX_VCPUS,
};
use crate::wire::{DecodeError, Reader, Writer};

/// Most bitmap words in one `DirtyBitmap` frame (covers 4 GiB of guest RAM).
pub const MAX_BITMAP_WORDS: usize = 1 << 14;

/// Frame kinds of the local connection.
pub mod kind {
    #![allow(missing_docs)]
    pub const OUTGOING: u8 = 0x41;
    pub const INCOMING: u8 = 0x42;
    pub const DIRTY_BITMAP: u8 = 0x43;
    pub const BITMAP_END: u8 = 0x44;
    pub const MACHINE_STATE: u8 = 0x45;
    pub const STATE_LOADED: u8 = 0x46;
    pub const SET_PARAMS: u8 = 0x47;
    pub const CANCEL: u8 = 0x48;
    pub const START_POSTCOPY: u8 = 0x49;
    pub const VCPU_THREADS: u8 = 0x4a;
    pub const LISTENING: u8 = 0x61;
    pub const HARVEST: u8 = 0x62;
    pub const PROGRESS: u8 = 0x63;
    pub const COMPLETED: u8 = 0x65;
    pub const FAILED: u8 = 0x66;
    pub const POSTCOPY_BEGIN: u8 = 0x67;
    pub const POSTCOPY_PROGRESS: u8 = 0x68;
    pub const COMMITTED: u8 = 0x69;
    pub const RUN: u8 = 0x6a;
    pub const POSTCOPY_PAUSED: u8 = 0x6b;
    pub const PAUSE: u8 = 0x4b;
    pub const RESUME: u8 = 0x4c;
    pub const RECOVER: u8 = 0x4d;
    pub const RESUME_INCOMING: u8 = 0x4e;
    pub const RESUME_OUTGOING: u8 = 0x4f;
    pub const SESSION: u8 = 0x6c;
}

/// A RAM block as the VMM that owns it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlock {
    /// Name, guest address and size.
    pub desc: BlockDesc,
    /// Offset of the block in the memfd.
    pub memfd_offset: u64,
    /// Address of the block in the VMM's address space (where a userfaultfd places pages).
    pub host_addr: u64,
}

fn encode_local_blocks(w: &mut Writer, blocks: &[LocalBlock]) {
    w.u32(blocks.len() as u32);
    for b in blocks {
        b.desc.encode(w);
        w.u64(b.memfd_offset);
        w.u64(b.host_addr);
    }
}

fn decode_local_blocks(r: &mut Reader) -> Result<Vec<LocalBlock>, DecodeError> {
    let n = r.count("block count", 34)?;
    if n == 0 || n > MAX_BLOCKS {
        return Err(DecodeError::invalid(
            "block count",
            format!("{n} not in 1..={MAX_BLOCKS}"),
        ));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(LocalBlock {
            desc: BlockDesc::decode(r)?,
            memfd_offset: r.u64("memfd offset")?,
            host_addr: r.u64("host address")?,
        });
    }
    Ok(v)
}

/// How the peer connections of a session are authenticated: given by the VMM with the request
/// that opens the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAuth {
    /// The migration's shared secret; `None` uses umemd's host key file, if it has one.
    pub secret: Option<Secret>,
    /// Allow a TCP migration to or from a non-loopback address without any secret.
    pub insecure: bool,
    /// Run every TCP connection over TLS with the certificates in this directory (umemd reads
    /// it); `None` uses umemd's host directory, if it has one.
    pub tls_creds: Option<String>,
}

impl PeerAuth {
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.secret.as_ref().map_or(&[][..], |s| s.as_bytes()));
        w.bool(self.insecure);
        w.str(self.tls_creds.as_deref().unwrap_or(""));
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let bytes = r.bytes("secret")?;
        let secret = match bytes.len() {
            0 => None,
            _ => Some(
                Secret::new(bytes.to_vec())
                    .map_err(|e| DecodeError::invalid("secret", e.to_string()))?,
            ),
        };
        let insecure = r.bool("insecure")?;
        let tls_creds = match r.str("tls_creds")? {
            "" => None,
            dir => Some(dir.to_owned()),
        };
        Ok(PeerAuth {
            secret,
            insecure,
            tls_creds,
        })
    }
}

/// A message on a VMM's connection to umemd, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalMessage {
    /// VMM: migrate this VM out to `uri` (`tcp:HOST:PORT`). The memfd rides along.
    Outgoing {
        /// Name of the VM, for logs.
        vm: String,
        /// Where the destination umemd listens.
        uri: String,
        /// Tunables.
        params: MigrationParams,
        /// RAM layout.
        blocks: Vec<LocalBlock>,
        /// How the connections to the destination authenticate.
        auth: PeerAuth,
    },
    /// VMM: receive a VM on `uri`. The memfd (and the userfaultfd when `has_uffd`) ride along.
    Incoming {
        /// Name of the VM, for logs.
        vm: String,
        /// Where to listen (`tcp:HOST:PORT`; port 0 picks one).
        uri: String,
        /// RAM layout.
        blocks: Vec<LocalBlock>,
        /// Whether a userfaultfd was passed.
        has_uffd: bool,
        /// How the source's connections must authenticate.
        auth: PeerAuth,
    },
    /// VMM (destination), to a umemd started again: go on with postcopy session `session_id`,
    /// whose VM runs here with pages still missing. The memfd and the userfaultfd ride along;
    /// umemd listens on `uri` (where the old one listened) for the source to come back.
    ResumeIncoming {
        /// Name of the VM, for logs.
        vm: String,
        /// Where to listen (the address the source reconnects to).
        uri: String,
        /// RAM layout.
        blocks: Vec<LocalBlock>,
        /// The migration to go on with.
        session_id: u64,
        /// How the peer connections authenticate.
        auth: PeerAuth,
    },
    /// VMM (source), to a umemd started again: go on with postcopy session `session_id`,
    /// whose VM runs on the destination at `uri`; the memfd rides along. The destination says
    /// which pages it holds, and the rest is sent.
    ResumeOutgoing {
        /// Name of the VM, for logs.
        vm: String,
        /// Where the destination listens.
        uri: String,
        /// Tunables.
        params: MigrationParams,
        /// RAM layout.
        blocks: Vec<LocalBlock>,
        /// The migration to go on with.
        session_id: u64,
        /// How the peer connections authenticate.
        auth: PeerAuth,
    },
    /// umemd: the migration's session id, which a later connection (a recovery, a umemd
    /// started again) names it by.
    Session(u64),
    /// VMM: dirty pages of one block, one bit per page from `first_page`.
    DirtyBitmap {
        /// Block index.
        block: u32,
        /// Page of bit 0 of word 0.
        first_page: u64,
        /// Bits, little-endian within each word.
        words: Vec<u64>,
    },
    /// VMM: the harvest asked for is complete; `stopped` says the vCPUs are stopped.
    BitmapEnd {
        /// vCPUs are stopped: this was the final harvest.
        stopped: bool,
    },
    /// Either way: the machine state blob.
    MachineState(Vec<u8>),
    /// VMM (destination): the machine state is loaded.
    StateLoaded,
    /// VMM: new tunables for the running migration.
    SetParams(MigrationParams),
    /// VMM: cancel the migration.
    Cancel,
    /// VMM: switch a running precopy to postcopy now.
    StartPostcopy,
    /// VMM (destination): the host thread ids of its vCPUs, by vCPU index, so that blocked time
    /// can be told per vCPU.
    VcpuThreads(Vec<u32>),
    /// umemd (destination): the machine state that follows starts a postcopy phase: the VM runs
    /// while pages still arrive, so the VMM keeps its userfaultfd registered until `Completed`.
    PostcopyBegin,
    /// umemd: postcopy statistics so far.
    PostcopyProgress(PostcopyStats),
    /// umemd (source): the switchover is committed. The destination may run the VM from now
    /// on, so this VMM must never resume it by itself, whatever happens to the migration.
    Committed,
    /// umemd (destination): the source committed; the VM may run (unless the VMM was told to
    /// wait for `cont`). Until this arrives a loaded machine state must not run.
    Run,
    /// VMM (source): cut the postcopy link on purpose and wait for `Resume` before connecting
    /// again (`migrate-pause`).
    Pause,
    /// VMM (source): connect again, to `uri` from now on (`migrate-resume`).
    Resume {
        /// Where the destination listens now.
        uri: String,
    },
    /// VMM (destination): while postcopy is paused, listen for the source on `uri` instead
    /// (`migrate-recover`); umemd answers `Listening`.
    Recover {
        /// Where to listen (`tcp:HOST:PORT`, port 0 picks one; or `unix:PATH`).
        uri: String,
    },
    /// umemd: postcopy lost its link for this reason and waits for a new connection. The
    /// destination VM keeps running on the pages it has; `Progress` in phase `postcopy` says
    /// when it resumed.
    PostcopyPaused {
        /// Why the link was lost.
        reason: String,
    },
    /// umemd (destination): listening on this address.
    Listening {
        /// `tcp:HOST:PORT` actually bound.
        uri: String,
    },
    /// umemd (source): send the dirty bitmap; if `stop`, stop the vCPUs first and follow the
    /// bitmap with the machine state.
    Harvest {
        /// Stop the vCPUs before harvesting.
        stop: bool,
    },
    /// umemd: statistics so far.
    Progress(MigrationStats),
    /// umemd: the migration completed.
    Completed(MigrationStats),
    /// umemd: the migration failed.
    Failed {
        /// What went wrong.
        message: String,
        /// Statistics up to the failure.
        stats: MigrationStats,
    },
}

impl LocalMessage {
    /// Appends this message as one frame.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            LocalMessage::Outgoing {
                vm,
                uri,
                params,
                blocks,
                auth,
            } => frame::encode(buf, kind::OUTGOING, |w| {
                w.str(vm);
                w.str(uri);
                params.encode(w);
                encode_local_blocks(w, blocks);
                auth.encode(w);
            }),
            LocalMessage::Incoming {
                vm,
                uri,
                blocks,
                has_uffd,
                auth,
            } => frame::encode(buf, kind::INCOMING, |w| {
                w.str(vm);
                w.str(uri);
                encode_local_blocks(w, blocks);
                w.bool(*has_uffd);
                auth.encode(w);
            }),
            LocalMessage::ResumeIncoming {
                vm,
                uri,
                blocks,
                session_id,
                auth,
            } => frame::encode(buf, kind::RESUME_INCOMING, |w| {
                w.str(vm);
                w.str(uri);
                encode_local_blocks(w, blocks);
                w.u64(*session_id);
                auth.encode(w);
            }),
            LocalMessage::ResumeOutgoing {
                vm,
                uri,
                params,
                blocks,
                session_id,
                auth,
            } => frame::encode(buf, kind::RESUME_OUTGOING, |w| {
                w.str(vm);
                w.str(uri);
                params.encode(w);
                encode_local_blocks(w, blocks);
                w.u64(*session_id);
                auth.encode(w);
            }),
            LocalMessage::Session(id) => frame::encode(buf, kind::SESSION, |w| w.u64(*id)),
            LocalMessage::DirtyBitmap {
                block,
                first_page,
                words,
            } => frame::encode(buf, kind::DIRTY_BITMAP, |w| {
                w.u32(*block);
                w.u64(*first_page);
                w.u32(words.len() as u32);
                for x in words {
                    w.u64(*x);
                }
            }),
            LocalMessage::BitmapEnd { stopped } => {
                frame::encode(buf, kind::BITMAP_END, |w| w.bool(*stopped))
            }
            LocalMessage::MachineState(b) => {
                frame::encode(buf, kind::MACHINE_STATE, |w| w.bytes(b))
            }
            LocalMessage::StateLoaded => frame::encode(buf, kind::STATE_LOADED, |_| {}),
            LocalMessage::SetParams(p) => frame::encode(buf, kind::SET_PARAMS, |w| p.encode(w)),
            LocalMessage::Cancel => frame::encode(buf, kind::CANCEL, |_| {}),
            LocalMessage::StartPostcopy => frame::encode(buf, kind::START_POSTCOPY, |_| {}),
            LocalMessage::VcpuThreads(tids) => frame::encode(buf, kind::VCPU_THREADS, |w| {
                w.u32(tids.len() as u32);
                for t in tids {
                    w.u32(*t);
                }
            }),
            LocalMessage::PostcopyBegin => frame::encode(buf, kind::POSTCOPY_BEGIN, |_| {}),
            LocalMessage::Committed => frame::encode(buf, kind::COMMITTED, |_| {}),
            LocalMessage::Run => frame::encode(buf, kind::RUN, |_| {}),
            LocalMessage::Pause => frame::encode(buf, kind::PAUSE, |_| {}),
            LocalMessage::Resume { uri } => frame::encode(buf, kind::RESUME, |w| w.str(uri)),
            LocalMessage::Recover { uri } => frame::encode(buf, kind::RECOVER, |w| w.str(uri)),
            LocalMessage::PostcopyPaused { reason } => {
                frame::encode(buf, kind::POSTCOPY_PAUSED, |w| w.str(reason))
            }
            LocalMessage::PostcopyProgress(s) => {
                frame::encode(buf, kind::POSTCOPY_PROGRESS, |w| s.encode(w))
            }
            LocalMessage::Listening { uri } => frame::encode(buf, kind::LISTENING, |w| w.str(uri)),
            LocalMessage::Harvest { stop } => frame::encode(buf, kind::HARVEST, |w| w.bool(*stop)),
            LocalMessage::Progress(s) => frame::encode(buf, kind::PROGRESS, |w| s.encode(w)),
            LocalMessage::Completed(s) => frame::encode(buf, kind::COMPLETED, |w| s.encode(w)),
            LocalMessage::Failed { message, stats } => frame::encode(buf, kind::FAILED, |w| {
                w.str(message);
                stats.encode(w);
            }),
        }
    }

    /// Decodes a frame body of `kind`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let msg = match kind {
            kind::OUTGOING => LocalMessage::Outgoing {
                vm: r.str("vm name")?.to_owned(),
                uri: r.str("uri")?.to_owned(),
                params: MigrationParams::decode(&mut r)?,
                blocks: decode_local_blocks(&mut r)?,
                auth: PeerAuth::decode(&mut r)?,
            },
            kind::INCOMING => LocalMessage::Incoming {
                vm: r.str("vm name")?.to_owned(),
                uri: r.str("uri")?.to_owned(),
                blocks: decode_local_blocks(&mut r)?,
                has_uffd: r.bool("has_uffd")?,
                auth: PeerAuth::decode(&mut r)?,
            },
            kind::RESUME_INCOMING => LocalMessage::ResumeIncoming {
                vm: r.str("vm name")?.to_owned(),
                uri: r.str("uri")?.to_owned(),
                blocks: decode_local_blocks(&mut r)?,
                session_id: r.u64("session_id")?,
                auth: PeerAuth::decode(&mut r)?,
            },
            kind::RESUME_OUTGOING => LocalMessage::ResumeOutgoing {
                vm: r.str("vm name")?.to_owned(),
                uri: r.str("uri")?.to_owned(),
                params: MigrationParams::decode(&mut r)?,
                blocks: decode_local_blocks(&mut r)?,
                session_id: r.u64("session_id")?,
                auth: PeerAuth::decode(&mut r)?,
            },
            kind::SESSION => LocalMessage::Session(r.u64("session_id")?),
            kind::DIRTY_BITMAP => {
                let block = r.u32("bitmap block")?;
                let first_page = r.u64("bitmap first page")?;
                let n = r.count("bitmap words", 8)?;
                if n > MAX_BITMAP_WORDS {
                    return Err(DecodeError::invalid(
                        "bitmap words",
                        format!("{n} exceeds {MAX_BITMAP_WORDS}"),
                    ));
                }
                let mut words = Vec::with_capacity(n);
                for _ in 0..n {
                    words.push(r.u64("bitmap word")?);
                }
                LocalMessage::DirtyBitmap {
                    block,
                    first_page,
                    words,
                }
            }
            kind::BITMAP_END => LocalMessage::BitmapEnd {
                stopped: r.bool("stopped")?,
            },
            kind::MACHINE_STATE => LocalMessage::MachineState(r.bytes("machine state")?.to_vec()),
            kind::STATE_LOADED => LocalMessage::StateLoaded,
            kind::SET_PARAMS => LocalMessage::SetParams(MigrationParams::decode(&mut r)?),
            kind::CANCEL => LocalMessage::Cancel,
            kind::START_POSTCOPY => LocalMessage::StartPostcopy,
            kind::VCPU_THREADS => {
                let n = r.count("vcpu thread count", 4)?;
                if n > MAX_VCPUS {
                    return Err(DecodeError::invalid(
                        "vcpu thread count",
                        format!("{n} exceeds {MAX_VCPUS}"),
                    ));
                }
                LocalMessage::VcpuThreads(
                    (0..n)
                        .map(|_| r.u32("vcpu thread id"))
                        .collect::<Result<_, _>>()?,
                )
            }
            kind::POSTCOPY_BEGIN => LocalMessage::PostcopyBegin,
            kind::COMMITTED => LocalMessage::Committed,
            kind::RUN => LocalMessage::Run,
            kind::PAUSE => LocalMessage::Pause,
            kind::RESUME => LocalMessage::Resume {
                uri: r.str("uri")?.to_owned(),
            },
            kind::RECOVER => LocalMessage::Recover {
                uri: r.str("uri")?.to_owned(),
            },
            kind::POSTCOPY_PAUSED => LocalMessage::PostcopyPaused {
                reason: r.str("reason")?.to_owned(),
            },
            kind::POSTCOPY_PROGRESS => {
                LocalMessage::PostcopyProgress(PostcopyStats::decode(&mut r)?)
            }
            kind::LISTENING => LocalMessage::Listening {
                uri: r.str("uri")?.to_owned(),
            },
            kind::HARVEST => LocalMessage::Harvest {
                stop: r.bool("stop")?,
            },
            kind::PROGRESS => LocalMessage::Progress(MigrationStats::decode(&mut r)?),
            kind::COMPLETED => LocalMessage::Completed(MigrationStats::decode(&mut r)?),
            kind::FAILED => LocalMessage::Failed {
                message: r.str("error text")?.to_owned(),
                stats: MigrationStats::decode(&mut r)?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MigrationMode, Phase};

    #[test]
    fn every_kind_round_trips() {
        let blocks = vec![LocalBlock {
            desc: BlockDesc {
                name: "ram-high".into(),
                guest_addr: 1 << 32,
                size: 1 << 30,
            },
            memfd_offset: 3 << 30,
            host_addr: 0x7f00_0000_0000,
        }];
        let stats = MigrationStats {
            phase: Phase::Precopy,
            rounds: 2,
            pages_sent: 10,
            ..Default::default()
        };
        let params = MigrationParams {
            mode: MigrationMode::Hybrid,
            ..Default::default()
        };
        for m in [
            LocalMessage::Outgoing {
                vm: "vm0".into(),
                uri: "tcp:127.0.0.1:4444".into(),
                params,
                blocks: blocks.clone(),
                auth: PeerAuth::default(),
            },
            LocalMessage::Incoming {
                vm: "vm0".into(),
                uri: "tcp:0.0.0.0:0".into(),
                blocks: blocks.clone(),
                has_uffd: true,
                auth: PeerAuth {
                    secret: Some(Secret::new(b"0123456789abcdef".to_vec()).unwrap()),
                    insecure: true,
                    tls_creds: Some("/etc/umem/tls".into()),
                },
            },
            LocalMessage::DirtyBitmap {
                block: 1,
                first_page: 64,
                words: vec![u64::MAX, 0, 5],
            },
            LocalMessage::BitmapEnd { stopped: true },
            LocalMessage::MachineState(vec![9; 100]),
            LocalMessage::StateLoaded,
            LocalMessage::SetParams(params),
            LocalMessage::Cancel,
            LocalMessage::StartPostcopy,
            LocalMessage::VcpuThreads(vec![100, 101]),
            LocalMessage::PostcopyBegin,
            LocalMessage::Committed,
            LocalMessage::Run,
            LocalMessage::PostcopyPaused {
                reason: "link".into(),
            },
            LocalMessage::ResumeIncoming {
                vm: "vm0".into(),
                uri: "tcp:0.0.0.0:4444".into(),
                blocks: blocks.clone(),
                session_id: 42,
                auth: PeerAuth::default(),
            },
            LocalMessage::ResumeOutgoing {
                vm: "vm0".into(),
                uri: "tcp:10.0.0.2:4444".into(),
                params,
                blocks: blocks.clone(),
                session_id: 42,
                auth: PeerAuth::default(),
            },
            LocalMessage::Session(42),
            LocalMessage::Pause,
            LocalMessage::Resume {
                uri: "tcp:10.0.0.3:4444".into(),
            },
            LocalMessage::Recover {
                uri: "tcp:0.0.0.0:0".into(),
            },
            LocalMessage::PostcopyProgress(PostcopyStats {
                faults: 3,
                latency_hist: [1; crate::types::LATENCY_BUCKETS],
                vcpu_blocked_us: vec![5, 6],
                stage_fetch_us: [40, 900],
                ..Default::default()
            }),
            LocalMessage::Listening {
                uri: "tcp:127.0.0.1:5555".into(),
            },
            LocalMessage::Harvest { stop: false },
            LocalMessage::Progress(stats),
            LocalMessage::Completed(stats),
            LocalMessage::Failed {
                message: "refused".into(),
                stats,
            },
        ] {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            let (p, body, rest) = frame::split(&buf).unwrap().unwrap();
            assert!(rest.is_empty());
            assert_eq!(LocalMessage::decode(p.kind, body).unwrap(), m);
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut buf = Vec::new();
        frame::encode(&mut buf, kind::CANCEL, |w| w.u8(0));
        let (p, body, _) = frame::split(&buf).unwrap().unwrap();
        assert_eq!(
            LocalMessage::decode(p.kind, body),
            Err(DecodeError::TrailingBytes(1))
        );
    }
}
