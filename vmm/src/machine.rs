//! The running machine as the control API sees it: the VM, its run status and its migration.

use std::sync::{Arc, Mutex, MutexGuard};

use proto::{MigrationParams, MigrationStats, Phase, PostcopyStats};
use serde::Serialize;

use crate::vm::Vm;

/// Run status, in the spirit of QMP's `query-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// vCPUs run.
    Running,
    /// Stopped by request.
    Paused,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Stopped for the switchover of an outgoing migration.
    FinishMigrate,
    /// Migrated away; this copy no longer runs.
    Postmigrate,
    /// The incoming migration failed, the VM never ran, and it could not listen again (its
    /// umemd is gone).
    MigrateFailed,
    /// A vCPU hit an unrecoverable exit.
    InternalError,
    /// The VM ran on this host in postcopy and lost its page server: the vCPUs are stopped and
    /// the memory is kept, missing pages still missing (never read as zeros).
    PostcopyPaused,
}

/// How the VM moved: which kind of switchover really happened (a hybrid migration whose
/// precopy converged ends in a precopy one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switchover {
    /// Every page moved before the VM ran on the destination.
    Precopy,
    /// The VM ran on the destination while pages still came.
    Postcopy,
}

/// What the control API reports about the current or last migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationInfo {
    /// Phase.
    pub phase: Phase,
    /// Latest statistics from umemd.
    pub stats: MigrationStats,
    /// Latest postcopy statistics from umemd, once postcopy has begun.
    pub postcopy: Option<PostcopyStats>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Destination: where umemd listens.
    pub listen_uri: Option<String>,
    /// Destination: incoming migrations that failed before the VM ran; after each the VM
    /// listens again with its RAM reset, and `error` says why the last one failed.
    pub failed_attempts: u32,
    /// Source: where it is going.
    pub uri: Option<String>,
    /// The migration's session id (a umemd started again is told to go on with it).
    pub session_id: Option<u64>,
    /// The switchover that happened, once known: `postcopy` from the moment the VM runs on
    /// the destination with pages missing, `precopy` when the migration completed without.
    pub switchover: Option<Switchover>,
}

/// Mutable state shared by the control API and the migration thread.
#[derive(Debug)]
pub struct ControlState {
    /// Run status.
    pub status: Status,
    /// Migration progress.
    pub migration: MigrationInfo,
    /// Tunables for the next (or running) migration.
    pub params: MigrationParams,
    /// Sends `Cancel`, `SetParams` and `StartPostcopy` to umemd on the running outgoing
    /// migration's connection.
    pub umemd: Option<umem_client::OutgoingControl>,
    /// Destination: steers the incoming migration's umemd session (`migrate-recover`).
    pub incoming: Option<umem_client::IncomingControl>,
    /// Whether the guest ran when the outgoing migration began (to resume it on failure).
    pub was_running: bool,
    /// Destination: the userfaultfd over guest RAM, held until every page is present.
    pub uffd: Option<crate::uffd::RamUffd>,
    /// How the current (or last) migration's peer connections authenticate; kept so that a
    /// umemd taking the migration over, or listening again, uses the same secret.
    pub peer_auth: proto::local::PeerAuth,
    /// Started with `--incoming defer`: `migrate-incoming` has yet to say where to listen;
    /// whether to run the VM once it arrived.
    pub deferred_incoming: Option<bool>,
}

/// A VM under control.
#[derive(Debug)]
pub struct Machine {
    /// The VM.
    pub vm: Vm,
    /// VM name (for umemd logs).
    pub name: String,
    /// Path of umemd's socket.
    pub umemd_socket: std::path::PathBuf,
    state: Mutex<ControlState>,
}

impl Machine {
    /// Wraps a VM in `status`.
    pub fn new(
        vm: Vm,
        name: String,
        umemd_socket: std::path::PathBuf,
        status: Status,
    ) -> Arc<Self> {
        Arc::new(Machine {
            vm,
            name,
            umemd_socket,
            state: Mutex::new(ControlState {
                status,
                migration: MigrationInfo::default(),
                params: MigrationParams::default(),
                umemd: None,
                incoming: None,
                was_running: false,
                uffd: None,
                peer_auth: Default::default(),
                deferred_incoming: None,
            }),
        })
    }

    /// Locks the shared state.
    pub fn state(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current status, with vCPU faults taking precedence.
    pub fn status(&self) -> Status {
        let status = self.state().status;
        if status != Status::PostcopyPaused && self.vm.vcpu_control().fault().is_some() {
            return Status::InternalError;
        }
        status
    }

    /// Stops the guest.
    pub fn stop(&self) -> Result<(), String> {
        let mut s = self.state();
        match s.status {
            Status::Running | Status::Paused => {
                self.vm.pause();
                s.status = Status::Paused;
                Ok(())
            }
            other => Err(format!("cannot stop a VM in status {other:?}")),
        }
    }

    /// Resumes the guest. A VM that migrated away (`postmigrate`) resumes only with `force`,
    /// once no migration is under way: after a committed switchover whose migration then
    /// failed, the operator who knows that the destination does not run the VM takes it back.
    pub fn cont(&self, force: bool) -> Result<(), String> {
        let mut s = self.state();
        match s.status {
            Status::Running | Status::Paused => {
                s.status = Status::Running;
                self.vm.resume();
                Ok(())
            }
            Status::Postmigrate if s.migration.phase == proto::Phase::Completed => Err(
                "the migration completed: the VM runs on the destination; this copy is stale"
                    .into(),
            ),
            Status::Postmigrate if s.umemd.is_some() => Err(
                "the migration is still under way; it must end before this copy may resume"
                    .into(),
            ),
            Status::Postmigrate if force => {
                log::warn!(
                    "resuming a VM whose switchover was committed (cont force=true): the destination must not run it"
                );
                s.status = Status::Running;
                s.migration.phase = proto::Phase::Failed;
                self.vm.resume();
                Ok(())
            }
            Status::Postmigrate => Err(
                "the switchover was committed, so the destination may run this VM; if it surely does not (its VMM is gone or never ran it), \"cont\" with force=true resumes this copy"
                    .into(),
            ),
            other => Err(format!(
                "cannot continue a VM in status {}",
                serde_json::to_string(&other).unwrap_or_default()
            )),
        }
    }
}
