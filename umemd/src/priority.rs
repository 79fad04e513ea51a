//! Thread priorities.

/// Lowers the calling thread's scheduling priority (nice 10); best effort.
pub fn lower_priority() {
    // SAFETY: setpriority on the calling thread (tid) changes only its nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        log::debug!(
            "lowering the background thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
