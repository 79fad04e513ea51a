//! The complete machine state that moves at switchover: every vCPU's registers and the
//! VM-wide devices. Encoded with postcard; the blob is opaque to umemd.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// Version of the blob layout; a destination refuses any other.
pub const STATE_VERSION: u32 = 1;

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (XSAVE covers the legacy FPU area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists as saveable and that reads back, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers (with an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Multiprocessing state (runnable, waiting for SIPI, halted).
    pub mp_state: Option<kvm_mp_state>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// The UART's registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UartState {
    /// Registers in vm-superio's order (divisor low/high, IER, IIR, LCR, LSR, MCR, MSR, SCR).
    pub regs: [u8; 9],
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(u: &UartState) -> Self {
        let r = u.regs;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: u.in_buffer.clone(),
        }
    }
}

/// Everything but RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave and IOAPIC, when an in-kernel irqchip exists.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub uart: UartState,
}

/// Errors of state encoding.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The blob did not decode.
    #[error("machine state blob: {0}")]
    Decode(#[from] postcard::Error),
    /// The blob is from another layout version.
    #[error("machine state version {0}, expected {STATE_VERSION}")]
    Version(u32),
}

impl MachineState {
    /// Encodes the state.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        Ok(postcard::to_stdvec(self)?)
    }

    /// Decodes and version-checks a blob.
    pub fn from_bytes(b: &[u8]) -> Result<Self, StateError> {
        let s: MachineState = postcard::from_bytes(b)?;
        if s.version != STATE_VERSION {
            return Err(StateError::Version(s.version));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_state_round_trips() {
        let s = SerialState {
            scratch: 7,
            in_buffer: vec![1, 2],
            ..Default::default()
        };
        let back: SerialState = (&UartState::from(&s)).into();
        assert_eq!(back, s);
    }

    #[test]
    fn garbage_blob_is_an_error() {
        assert!(MachineState::from_bytes(&[0xff; 16]).is_err());
        assert!(MachineState::from_bytes(&[]).is_err());
    }
}
