//! The link to the destination VMM: loading the machine state, vCPU threads, cancel, and a
//! new address to listen on while postcopy is paused.

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::Instant;

use log::{info, warn};
use proto::local::LocalMessage;

use super::error::DestError;
use super::phase::DestPhase;
use super::{Dest, LOAD_TIMEOUT};
use crate::link::send_local;
use crate::stream::PeerListener;

impl Dest {
    pub(super) fn load_state(&mut self, state: Vec<u8>) -> Result<(), DestError> {
        send_local(&mut self.vmm, &LocalMessage::MachineState(state)).map_err(DestError::Vmm)?;
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vmm_rx.recv_timeout(left) {
                Ok(Ok(LocalMessage::StateLoaded)) => return Ok(()),
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Failed { message, .. })) => {
                    return Err(DestError::StateRefused(message))
                }
                Ok(Ok(other)) => return Err(DestError::VmmUnexpected(format!("{other:?}"))),
                Ok(Err(e)) => return Err(DestError::VmmLink(e)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(DestError::Timeout {
                        waiting_for: "the VMM's word that it loaded the machine state",
                        secs: LOAD_TIMEOUT.as_secs(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(DestError::VmmLost),
            }
        }
    }

    pub(super) fn set_vcpu_threads(&mut self, tids: Vec<u32>) {
        self.vcpus = tids.len();
        if let Some(pc) = &self.postcopy {
            pc.fault.set_vcpu_threads(&tids);
        }
    }

    /// `migrate-recover`: the source will come back on `uri`. The old listener stays if the
    /// new one cannot be bound, and the VMM is told where umemd listens either way.
    fn listen_instead(&mut self, uri: &str) {
        let exposed = self
            .gate
            .trust()
            .check_exposure(uri, crate::auth::Side::Listen);
        let bound = exposed
            .map_err(DestError::from)
            .and_then(|()| PeerListener::bind(uri).map_err(DestError::from))
            .and_then(|l| Ok((l.uri()?, l)));
        match bound.and_then(|(new_uri, l)| {
            self.gate.open(l).map_err(DestError::Accept)?;
            Ok(new_uri)
        }) {
            Ok(new_uri) => {
                self.listen_uri = new_uri;
                info!("{}: listening for the source on {uri} instead", self.vm);
            }
            Err(e) => warn!("{}: migrate-recover: {e}; listening where it was", self.vm),
        }
        let uri = self.listen_uri.clone();
        let _ = send_local(&mut self.vmm, &LocalMessage::Listening { uri });
    }

    pub(super) fn poll_vmm(&mut self) -> Result<(), DestError> {
        loop {
            match self.vmm_rx.try_recv() {
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Cancel)) if !self.phase.running() => {
                    return Err(DestError::Cancelled)
                }
                Ok(Ok(LocalMessage::Recover { uri }))
                    if self.phase == DestPhase::PostcopyPaused =>
                {
                    self.listen_instead(&uri);
                }
                Ok(Ok(LocalMessage::Recover { uri })) => {
                    warn!(
                        "{}: migrate-recover {uri} ignored: postcopy is not paused ({})",
                        self.vm, self.phase
                    );
                }
                Ok(Ok(other)) => return Err(DestError::VmmUnexpected(format!("{other:?}"))),
                Ok(Err(e)) => return Err(DestError::VmmLink(e)),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(DestError::VmmLost),
            }
        }
    }
}
