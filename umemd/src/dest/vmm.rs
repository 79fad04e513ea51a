//! The link to the destination VMM: loading the machine state, vCPU threads, cancel.

use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::time::Instant;

use proto::local::LocalMessage;

use super::{Dest, LOAD_TIMEOUT};
use crate::link::send_local;

impl Dest {
    pub(super) fn load_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        send_local(&mut self.vmm, &LocalMessage::MachineState(state))
            .map_err(|e| format!("VMM connection: {e}"))?;
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vmm_rx.recv_timeout(left) {
                Ok(Ok(LocalMessage::StateLoaded)) => return Ok(()),
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Failed { message, .. })) => {
                    return Err(format!("VMM could not load the machine state: {message}"))
                }
                Ok(Ok(other)) => return Err(format!("unexpected message from the VMM: {other:?}")),
                Ok(Err(e)) => return Err(format!("VMM connection: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err("VMM did not load the state in time".into())
                }
                Err(RecvTimeoutError::Disconnected) => return Err("VMM connection lost".into()),
            }
        }
    }

    pub(super) fn set_vcpu_threads(&mut self, tids: Vec<u32>) {
        if let Some(pc) = &self.postcopy {
            pc.fault.set_vcpu_threads(&tids);
        }
    }

    pub(super) fn poll_vmm(&mut self) -> Result<(), String> {
        loop {
            match self.vmm_rx.try_recv() {
                Ok(Ok(LocalMessage::VcpuThreads(t))) => self.set_vcpu_threads(t),
                Ok(Ok(LocalMessage::Cancel)) if !self.phase.running() => {
                    return Err("migration cancelled on the destination".into())
                }
                Ok(Ok(other)) => return Err(format!("unexpected message from the VMM: {other:?}")),
                Ok(Err(e)) => return Err(format!("destination VMM connection: {e}")),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    return Err("destination VMM connection lost".into())
                }
            }
        }
    }
}
