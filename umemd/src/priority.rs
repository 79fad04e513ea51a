//! Thread priorities.

use std::time::Duration;

/// The nice value of the threads that push background pages once the VM runs on the
/// destination: below the vCPUs and the threads on a fault's path, which take the core from
/// them as soon as they wake (see [`shorten_time_slice`]), but not so far below that a busy
/// vCPU starves the push. At nice 10 the push had a tenth of a core a busy vCPU shared with
/// it; at 5 it has a quarter (3 runs alternating: 4 GiB random touch 0.60 -> 0.71 GB/s, fault
/// p99 410 -> 354 us, vCPU blocked 307 -> 272 ms).
pub const BACKGROUND_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority to [`BACKGROUND_NICE`]; best effort.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread (tid) changes only its nice value.
    let r = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            BACKGROUND_NICE,
        )
    };
    if r != 0 {
        log::debug!(
            "lowering the background thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The time slice of a thread on a fault's path.
pub const FAULT_PATH_SLICE: Duration = Duration::from_micros(100);

/// Gives the calling thread, which sleeps most of the time and must run as soon as it is
/// woken, a short time slice; best effort.
///
/// Linux's EEVDF scheduler (6.6 on) lets a thread it has just picked run to the end of its slice
/// (0.75 ms times 1 + log2 of the cores) before a woken thread of the same or higher priority
/// takes the core, unless the woken thread asks for a shorter slice (6.12 on: `sched_runtime`
/// of a `SCHED_OTHER` thread). The share of CPU stays what the nice value gives; only the
/// wait after a wake-up shortens. Older kernels ignore the field.
pub fn shorten_time_slice() {
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: FAULT_PATH_SLICE.as_nanos() as u64,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr on the calling thread (pid 0) reads `attr`, a valid sched_attr of
    // the size it states, and changes only the thread's scheduling parameters.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r != 0 {
        log::debug!(
            "shortening a fault-path thread's time slice: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sched_getattr of the calling thread.
    fn current_attr() -> libc::sched_attr {
        // SAFETY: sched_attr is plain data; all zeros is a valid value.
        let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::sched_attr>() as u32;
        // SAFETY: sched_getattr writes at most `size` bytes into `attr`, which holds that many.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut libc::sched_attr,
                size,
                0,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        attr
    }

    #[test]
    fn a_background_thread_runs_below_normal_priority() {
        std::thread::spawn(|| {
            lower_priority();
            assert_eq!(current_attr().sched_nice, BACKGROUND_NICE);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_fault_path_thread_runs_with_a_short_slice_at_normal_priority() {
        std::thread::spawn(|| {
            shorten_time_slice();
            let attr = current_attr();
            assert_eq!(attr.sched_policy, libc::SCHED_OTHER as u32);
            assert_eq!(attr.sched_nice, 0);
            // Kernels before 6.12 have no custom slice for SCHED_OTHER and report 0.
            if attr.sched_runtime != 0 {
                assert_eq!(attr.sched_runtime, FAULT_PATH_SLICE.as_nanos() as u64);
            }
        })
        .join()
        .unwrap();
    }
}
