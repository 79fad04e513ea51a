//! A KVM virtual machine: memory slots, in-kernel irqchip and PIT, vCPUs, machine state and
//! dirty logging. The ioctl surface of KVM is reached only through kvm-ioctls, from here.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{PortBus, SerialOut, COM1_IRQ};
use crate::loader::{BootInfo, BOOTLOADER_MAGIC};
use crate::memory::GuestRam;
use crate::state::{MachineState, VcpuState, STATE_VERSION};
use crate::vcpu::{install_kick_handler, VcpuControl, Vcpus};

/// Errors of VM setup and state handling.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0} (a VM needs /dev/kvm read-write: run as root, or as a member of the group that owns it)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {err}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// The machine state does not fit this VM.
    #[error("machine state does not fit this VM: {0}")]
    StateMismatch(String),
    /// Other setup failures.
    #[error("{0}")]
    Setup(String),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

/// A VM with its RAM, devices and vCPU threads.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    ram: Arc<GuestRam>,
    bus: Arc<PortBus>,
    vcpus: Vcpus,
    has_irqchip: bool,
    msr_indices: Vec<u32>,
}

impl Vm {
    /// Creates the VM, its memory slots, devices and `vcpus` parked vCPU threads.
    pub fn new(ram: Arc<GuestRam>, vcpus: u32, serial_out: SerialOut) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        let has_irqchip = match fd.create_irq_chip() {
            Ok(()) => {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
                true
            }
            Err(e) => {
                warn!("no in-kernel irqchip ({e}); only vCPU 0 will run");
                false
            }
        };
        for (slot, b) in ram.blocks().iter().enumerate() {
            set_slot(&fd, &ram, slot, false)?;
            info!(
                "slot {slot}: {} at {:#x}, {} MiB",
                b.desc.name,
                b.desc.guest_addr,
                b.desc.size >> 20
            );
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Setup(format!("creating the UART eventfd: {e}")))?;
        if has_irqchip {
            fd.register_irqfd(&irq, COM1_IRQ)
                .map_err(ioctl("KVM_IRQFD"))?;
        }
        let bus = Arc::new(PortBus::new(irq, serial_out));

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::new();
        for id in 0..vcpus {
            let v = fd
                .create_vcpu(id as u64)
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            v.set_cpuid2(&vcpu_cpuid(&cpuid, id))
                .map_err(ioctl("KVM_SET_CPUID2"))?;
            fds.push(v);
        }
        let msr_indices = saveable_msrs(&kvm, &fds[0])?;
        install_kick_handler().map_err(|e| VmError::Setup(format!("signal handler: {e}")))?;
        let runnable = (0..vcpus).map(|i| i == 0 || has_irqchip).collect();
        let vcpus = Vcpus::start(fds, runnable, bus.clone());
        Ok(Vm {
            fd,
            ram,
            bus,
            vcpus,
            has_irqchip,
            msr_indices,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Run control of the vCPUs.
    pub fn vcpu_control(&self) -> &Arc<VcpuControl> {
        self.vcpus.control()
    }

    /// Puts vCPU 0 at the multiboot entry point: 32-bit protected mode, flat segments, no paging.
    pub fn setup_multiboot_entry(&self, boot: BootInfo) -> Result<(), VmError> {
        let Some(v) = self.vcpus.iter().next() else {
            return Err(VmError::Setup("no vCPU".into()));
        };
        let vcpu = v.fd.lock().unwrap_or_else(|p| p.into_inner());
        let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let flat = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(0x10, 0xb);
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            *s = flat(0x18, 0x3);
        }
        sregs.cr0 = 0x11; // PE | ET; paging stays off as multiboot specifies
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: boot.entry as u64,
            rax: BOOTLOADER_MAGIC as u64,
            rbx: boot.mbi as u64,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) {
        self.vcpus.resume();
    }

    /// Stops the vCPUs; returns when none is inside `KVM_RUN`.
    pub fn pause(&self) {
        self.vcpus.pause();
    }

    /// Stops the vCPUs for good with `reason`, without waiting for them to park.
    pub fn fail(&self, reason: String) {
        self.vcpus.fail(reason);
    }

    /// True while the vCPUs are meant to run.
    pub fn running(&self) -> bool {
        self.vcpus.running()
    }

    /// Turns dirty page logging on or off for every slot.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        for slot in 0..self.ram.blocks().len() {
            set_slot(&self.fd, &self.ram, slot, on)?;
        }
        Ok(())
    }

    /// Takes and clears the dirty bitmap of block `slot` (one bit per page).
    pub fn dirty_log(&self, slot: usize) -> Result<Vec<u64>, VmError> {
        let size = self.ram.blocks()[slot].desc.size as usize;
        self.fd
            .get_dirty_log(slot as u32, size)
            .map_err(ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// Reads the whole machine state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        let mut vcpus = Vec::new();
        for v in self.vcpus.iter() {
            let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
            vcpus.push(self.save_vcpu(v.id, &fd)?);
        }
        let mut irqchips = Vec::new();
        let mut pit = None;
        if self.has_irqchip {
            for chip_id in 0..3 {
                let mut c = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut c)
                    .map_err(ioctl("KVM_GET_IRQCHIP"))?;
                irqchips.push(c);
            }
            pit = Some(self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?);
        }
        let clock = self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        Ok(MachineState {
            version: STATE_VERSION,
            vcpus,
            irqchips,
            pit,
            clock,
            uart: (&self.bus.serial_state()).into(),
        })
    }

    fn save_vcpu(&self, id: u32, fd: &VcpuFd) -> Result<VcpuState, VmError> {
        let mut msrs = Msrs::from_entries(
            &self
                .msr_indices
                .iter()
                .map(|&index| kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| VmError::Setup(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if n != self.msr_indices.len() {
            return Err(VmError::Setup(format!(
                "read {n} of {} MSRs",
                self.msr_indices.len()
            )));
        }
        Ok(VcpuState {
            id,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic: if self.has_irqchip {
                Some(fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?)
            } else {
                None
            },
            mp_state: if self.has_irqchip {
                Some(fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?)
            } else {
                None
            },
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads a machine state. The vCPUs must be paused (they are, until the first resume).
    pub fn restore_state(&self, s: &MachineState) -> Result<(), VmError> {
        if s.vcpus.len() != self.vcpus.len() {
            return Err(VmError::StateMismatch(format!(
                "{} vCPUs in the state, {} here",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        if self.has_irqchip == s.irqchips.is_empty() {
            return Err(VmError::StateMismatch(
                "in-kernel irqchip present on one side only".into(),
            ));
        }
        if let Some(pit) = &s.pit {
            self.fd.set_pit2(pit).map_err(ioctl("KVM_SET_PIT2"))?;
        }
        for c in &s.irqchips {
            self.fd.set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
            restore_vcpu(&fd, st)?;
        }
        self.bus
            .restore_serial(&(&s.uart).into())
            .map_err(VmError::Setup)
    }
}

fn restore_vcpu(fd: &VcpuFd, st: &VcpuState) -> Result<(), VmError> {
    if let Some(mp) = &st.mp_state {
        fd.set_mp_state(*mp).map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    fd.set_sregs(&st.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&st.regs).map_err(ioctl("KVM_SET_REGS"))?;
    // SAFETY: the xsave area was read by KVM_GET_XSAVE on a vCPU of the same CPUID, so it is a
    // complete `kvm_xsave` of the size this kernel expects.
    unsafe { fd.set_xsave(&st.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&st.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&st.debugregs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    if let Some(l) = &st.lapic {
        fd.set_lapic(l).map_err(ioctl("KVM_SET_LAPIC"))?;
    }
    let entries: Vec<_> = st
        .msrs
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| VmError::Setup(format!("MSR list: {e:?}")))?;
    let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(VmError::StateMismatch(format!(
            "MSR {:#x} was refused",
            entries[n].index
        )));
    }
    fd.set_vcpu_events(&st.events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// KVM's supported CPUID with this vCPU's APIC id filled in.
fn vcpu_cpuid(base: &CpuId, id: u32) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}

/// The MSRs KVM lists as saveable that this vCPU can actually read and write back.
fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        let entry = [kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let Ok(mut m) = Msrs::from_entries(&entry) else {
            continue;
        };
        if vcpu.get_msrs(&mut m) == Ok(1) && vcpu.set_msrs(&m) == Ok(1) {
            out.push(index);
        }
    }
    Ok(out)
}

fn set_slot(fd: &VmFd, ram: &GuestRam, slot: usize, log_dirty: bool) -> Result<(), VmError> {
    let b = &ram.blocks()[slot];
    let (host, len) = ram.host_range(slot);
    let region = kvm_userspace_memory_region {
        slot: slot as u32,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: b.desc.guest_addr,
        memory_size: len as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is a live MAP_SHARED mapping owned by `ram`, which the VM keeps alive
    // (through its Arc) for as long as the slot exists.
    unsafe { fd.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
}

#[cfg(test)]
mod tests {
    //! These need `/dev/kvm`; without it they print a skip line, or fail when
    //! `UMEM_REQUIRE_KVM=1` (as in CI).

    use super::*;
    use crate::loader;

    const MEM: u64 = 64 << 20;

    fn kvm_present() -> bool {
        let present = std::path::Path::new("/dev/kvm").exists();
        if !present {
            assert!(
                std::env::var("UMEM_REQUIRE_KVM").as_deref() != Ok("1"),
                "/dev/kvm is missing and UMEM_REQUIRE_KVM=1"
            );
            eprintln!("SKIP: /dev/kvm not available");
        }
        present
    }

    fn vm(vcpus: u32) -> Vm {
        let ram = Arc::new(GuestRam::new(MEM).unwrap());
        Vm::new(ram, vcpus, Box::new(std::io::sink())).unwrap()
    }

    /// A VM with the memtouch guest loaded, not running.
    fn memtouch(cmdline: &str) -> Vm {
        let vm = vm(1);
        let image = crate::guests::builtin("memtouch").unwrap();
        let boot = loader::load(vm.ram(), image, cmdline).unwrap();
        vm.setup_multiboot_entry(boot).unwrap();
        vm
    }

    #[test]
    fn state_round_trips_into_another_vm() {
        if !kvm_present() {
            return;
        }
        let src = memtouch("");
        let saved = src.save_state().unwrap();
        let blob = saved.to_bytes().unwrap();
        let loaded = MachineState::from_bytes(&blob).unwrap();

        let dst = vm(1);
        dst.restore_state(&loaded).unwrap();
        let again = dst.save_state().unwrap();
        assert_eq!(again.vcpus.len(), 1);
        let (a, b) = (&saved.vcpus[0], &again.vcpus[0]);
        // The multiboot entry state (protected mode, eax = magic) arrived.
        assert_eq!(b.regs.rax, u64::from(crate::loader::BOOTLOADER_MAGIC));
        assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs));
        assert_eq!(format!("{:?}", a.sregs), format!("{:?}", b.sregs));
        assert_eq!(a.msrs.len(), b.msrs.len());
        assert_eq!(saved.irqchips.len(), again.irqchips.len());
        assert_eq!(saved.pit.is_some(), again.pit.is_some());
    }

    #[test]
    fn state_for_another_vcpu_count_is_refused() {
        if !kvm_present() {
            return;
        }
        let saved = vm(1).save_state().unwrap();
        let err = vm(2).restore_state(&saved).unwrap_err();
        assert!(matches!(err, VmError::StateMismatch(_)), "{err}");
    }

    #[test]
    fn dirty_log_reports_pages_the_guest_wrote() {
        if !kvm_present() {
            return;
        }
        // 16 pages from 16 MiB, one pass, then the guest halts.
        let vm = memtouch("base=0x1000000 pages=16 passes=1");
        vm.set_dirty_logging(true).unwrap();
        let slots = vm.ram().blocks().len();
        for slot in 0..slots {
            vm.dirty_log(slot).unwrap();
        }
        vm.resume();
        std::thread::sleep(std::time::Duration::from_millis(300));
        vm.pause();
        let bitmap = vm.dirty_log(0).unwrap();
        let dirty = |page: usize| bitmap[page / 64] & (1 << (page % 64)) != 0;
        let first = 0x1000000 / 4096;
        for page in first..first + 16 {
            assert!(
                dirty(page),
                "page {page:#x} written by the guest is not dirty"
            );
        }
        // Far outside the working set and the image: untouched.
        let last = (MEM / 4096) as usize - 1;
        assert!(!dirty(last));
        // Taken and cleared: nothing runs, nothing is dirty.
        assert!(vm.dirty_log(0).unwrap().iter().all(|&w| w == 0));
        vm.set_dirty_logging(false).unwrap();
    }
}
