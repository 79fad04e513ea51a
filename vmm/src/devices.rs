//! Port-I/O devices: the 16550 UART at 0x3F8 (vm-superio) and nothing else.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

type Uart = Serial<IrqTrigger, NoEvents, SerialOut>;

/// Dispatches port I/O from vCPUs to devices.
pub struct PortBus {
    serial: Mutex<Uart>,
}

impl std::fmt::Debug for PortBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortBus")
    }
}

impl PortBus {
    /// A bus with a UART writing to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        PortBus {
            serial: Mutex::new(Serial::new(IrqTrigger(irq), out)),
        }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest `out` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let (Some(off), Some(&v)) = (uart_offset(port), data.first()) {
            let mut u = self.uart();
            let _ = u.write(off, v);
            let _ = u.writer_mut().flush();
        }
    }

    /// A guest `in` from `port`; ports with no device read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match (uart_offset(port), data.first_mut()) {
            (Some(off), Some(b)) => *b = self.uart().read(off),
            _ => data.fill(0xff),
        }
    }

    /// The UART's registers, for migration.
    pub fn serial_state(&self) -> SerialState {
        self.uart().state()
    }

    /// Restores the UART's registers, keeping its output and interrupt.
    pub fn restore_serial(&self, state: &SerialState) -> Result<(), String> {
        let mut u = self.uart();
        let irq = u
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("cloning the UART irqfd: {e}"))?;
        let out = std::mem::replace(u.writer_mut(), Box::new(std::io::sink()));
        *u = Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("restoring the UART: {e:?}"))?;
        Ok(())
    }
}

fn uart_offset(port: u16) -> Option<u8> {
    (COM1_BASE..COM1_BASE + 8)
        .contains(&port)
        .then(|| (port - COM1_BASE) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<StdMutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn uart_output_and_state_survive_restore() {
        let cap = Capture::default();
        let bus = PortBus::new(EventFd::new(0).unwrap(), Box::new(cap.clone()));
        bus.write(COM1_BASE + 7, &[0x5a]); // scratch register
        bus.write(COM1_BASE, b"h");
        let state = bus.serial_state();
        let other = PortBus::new(EventFd::new(0).unwrap(), Box::new(cap.clone()));
        other.restore_serial(&state).unwrap();
        let mut b = [0u8];
        other.read(COM1_BASE + 7, &mut b);
        assert_eq!(b[0], 0x5a);
        other.write(COM1_BASE, b"i");
        assert_eq!(&*cap.0.lock().unwrap(), b"hi");
        let mut lsr = [0u8];
        other.read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        let mut none = [0u8; 2];
        other.read(0x60, &mut none);
        assert_eq!(none, [0xff, 0xff]);
    }
}
