//! vCPU threads: each runs `KVM_RUN` in a loop, dispatches port I/O to the devices, and parks
//! when the VM is paused so that its registers can be read or written from another thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{error, warn};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::devices::PortBus;

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
const KICK_SIGNAL: Signal = Signal::SIGUSR1;

/// What the VM's vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Quit,
}

#[derive(Debug)]
struct Shared {
    desired: Desired,
    /// vCPU threads currently parked (not in `KVM_RUN`).
    parked: usize,
    /// Set when a vCPU hit an unrecoverable exit; the VM stays paused.
    fault: Option<String>,
    /// Host thread id of each vCPU thread, 0 until it has started.
    tids: Vec<u32>,
}

/// Controls the run state of all vCPU threads of a VM.
#[derive(Debug)]
pub struct VcpuControl {
    shared: Mutex<Shared>,
    cv: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault that stopped the VM, if any.
    pub fn fault(&self) -> Option<String> {
        self.lock().fault.clone()
    }

    /// A halted vCPU's wait: up to `limit`, or until it is told to stop. A plain sleep
    /// could not be cut short (the kick's `EINTR` only resumes it), and held a stop, that is
    /// the downtime of an idle guest, for the rest of it.
    fn halt(&self, limit: Duration) {
        let s = self.lock();
        if s.desired == Desired::Run {
            let _ = self.cv.wait_timeout(s, limit);
        }
    }

    /// Host thread ids of the vCPU threads, by vCPU index, once all have started.
    pub fn thread_ids(&self) -> Vec<u32> {
        let mut s = self.lock();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.tids.contains(&0) && std::time::Instant::now() < deadline {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.tids.clone()
    }
}

/// One vCPU: its fd (lockable while parked) and its thread.
#[derive(Debug)]
pub struct Vcpu {
    /// KVM vCPU id.
    pub id: u32,
    /// The vCPU fd; the vCPU thread holds this lock only while inside `KVM_RUN`.
    pub fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

/// All vCPUs of a VM and their run control.
#[derive(Debug)]
pub struct Vcpus {
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// Installs the no-op kick handler without `SA_RESTART`, so `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(kick_handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { signal::sigaction(KICK_SIGNAL, &action) }.map(|_| ())
}

impl Vcpus {
    /// Starts one parked thread per vCPU fd. `runnable[i]` false keeps vCPU i parked for good
    /// (an AP that no in-kernel LAPIC could ever wake).
    pub fn start(fds: Vec<VcpuFd>, runnable: Vec<bool>, bus: Arc<PortBus>) -> Self {
        let control = Arc::new(VcpuControl {
            shared: Mutex::new(Shared {
                desired: Desired::Pause,
                parked: 0,
                fault: None,
                tids: vec![0; fds.len()],
            }),
            cv: Condvar::new(),
        });
        let vcpus = fds
            .into_iter()
            .zip(runnable)
            .enumerate()
            .map(|(i, (fd, runnable))| {
                let fd = Arc::new(Mutex::new(fd));
                let (c, f, b) = (control.clone(), fd.clone(), bus.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn(move || vcpu_loop(i as u32, runnable, f, c, b))
                    .ok();
                Vcpu {
                    id: i as u32,
                    fd,
                    thread,
                }
            })
            .collect();
        Vcpus { vcpus, control }
    }

    /// The vCPUs.
    pub fn iter(&self) -> impl Iterator<Item = &Vcpu> {
        self.vcpus.iter()
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// True with no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// The shared run control.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// Lets every vCPU run.
    pub fn resume(&self) {
        let mut s = self.control.lock();
        if s.desired != Desired::Quit && s.fault.is_none() {
            s.desired = Desired::Run;
        }
        self.control.cv.notify_all();
    }

    /// Stops every vCPU and returns once all are parked out of `KVM_RUN`.
    pub fn pause(&self) {
        self.stop(Desired::Pause);
    }

    /// Stops the VM for good with `reason`, without waiting: a vCPU may be blocked on a page
    /// that will never come, and it parks once the kick or the page reaches it.
    pub fn fail(&self, reason: String) {
        {
            let mut s = self.control.lock();
            s.fault.get_or_insert(reason);
            s.desired = Desired::Pause;
            self.control.cv.notify_all();
        }
        self.kick();
    }

    fn kick(&self) {
        for v in &self.vcpus {
            if let Some(t) = &v.thread {
                use std::os::unix::thread::JoinHandleExt;
                let _ = nix::sys::pthread::pthread_kill(t.as_pthread_t(), KICK_SIGNAL);
            }
        }
    }

    fn stop(&self, d: Desired) {
        let n = self.vcpus.iter().filter(|v| v.thread.is_some()).count();
        let mut s = self.control.lock();
        s.desired = d;
        self.control.cv.notify_all();
        while s.parked < n {
            drop(s);
            // A kick that lands just before a thread enters KVM_RUN is lost, so repeat it.
            self.kick();
            s = self.control.lock();
            s = self
                .control
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// True if the vCPUs are meant to be running.
    pub fn running(&self) -> bool {
        self.control.lock().desired == Desired::Run
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop(Desired::Quit);
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn vcpu_loop(
    id: u32,
    runnable: bool,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    bus: Arc<PortBus>,
) {
    let mut s = control.lock();
    s.parked += 1;
    if let Some(t) = s.tids.get_mut(id as usize) {
        *t = nix::unistd::gettid().as_raw() as u32;
    }
    control.cv.notify_all();
    loop {
        while !(s.desired == Desired::Run && runnable && s.fault.is_none()) {
            if s.desired == Desired::Quit {
                return;
            }
            s = control.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        drop(s);
        let outcome = run_until_kicked(id, &fd, &control, &bus);
        s = control.lock();
        s.parked += 1;
        if let Err(fault) = outcome {
            error!("vcpu{id}: {fault}; the VM is stopped");
            s.fault.get_or_insert(fault);
            s.desired = Desired::Pause;
        }
        control.cv.notify_all();
    }
}

/// Runs the vCPU until the VM is no longer meant to run (`Ok`) or the guest faults (`Err`).
fn run_until_kicked(
    id: u32,
    fd: &Mutex<VcpuFd>,
    control: &VcpuControl,
    bus: &PortBus,
) -> Result<(), String> {
    let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if control.lock().desired != Desired::Run {
            return Ok(());
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => control.halt(Duration::from_millis(1)),
            Ok(VcpuExit::Shutdown) => return Err("guest shut down (triple fault)".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!("VM entry failed: reason {reason:#x} on cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => return Err("KVM internal error".into()),
            Ok(other) => warn!("vcpu{id}: unhandled exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}
