//! The destination's userfaultfd over guest RAM. Created and registered before any state is
//! loaded (loading may touch RAM), handed to umemd, and kept open here until every page is
//! present: while any copy of it covers RAM, a missing page makes a vCPU wait instead of
//! reading zeros.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::memory::{GuestRam, RamBacking};

/// Errors of userfaultfd setup.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused the userfaultfd.
    #[error("creating a userfaultfd: {0} (a destination VMM needs one: run it as root, or allow unprivileged userfaultfds with sysctl vm.unprivileged_userfaultfd=1)")]
    Create(String),
    /// Registering a RAM block failed.
    #[error("registering {block} with the userfaultfd: {err}")]
    Register {
        /// Block name.
        block: String,
        /// Why.
        err: String,
    },
}

/// A userfaultfd with every RAM block registered in MISSING mode.
#[derive(Debug)]
pub struct RamUffd {
    uffd: Uffd,
    ranges: Vec<(usize, usize)>,
}

impl RamUffd {
    /// Creates the userfaultfd and registers all of `ram`. Faults raised inside the kernel (by
    /// KVM) must be caught too, so it is not user-mode-only. Thread ids of faulting threads are
    /// asked for where the kernel has them, so blocked time can be told per vCPU.
    pub fn new(ram: &GuestRam) -> Result<Self, UffdError> {
        let build = |features: FeatureFlags| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(features)
                .create()
        };
        // Missing-page faults on the RAM's kind of memory, asked for so that a kernel without
        // them fails here, by name, rather than at registration.
        let missing = match ram.backing() {
            RamBacking::Pages4K => FeatureFlags::MISSING_SHMEM,
            RamBacking::HugePages2M => FeatureFlags::MISSING_HUGETLBFS,
        };
        let uffd = build(missing | FeatureFlags::THREAD_ID)
            .or_else(|_| build(missing))
            .map_err(|e| UffdError::Create(e.to_string()))?;
        let mut ranges = Vec::new();
        for (i, b) in ram.blocks().iter().enumerate() {
            let (ptr, len) = ram.host_range(i);
            uffd.register_with_mode(ptr.cast(), len, RegisterMode::MISSING)
                .map_err(|e| UffdError::Register {
                    block: b.desc.name.clone(),
                    err: e.to_string(),
                })?;
            ranges.push((ptr as usize, len));
        }
        Ok(RamUffd { uffd, ranges })
    }

    /// The fd to hand to umemd.
    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// The fd to hand to umemd, borrowed.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// Every page is present: unregisters the RAM (waking anyone still queued) and closes.
    pub fn release(self) {
        for (ptr, len) in &self.ranges {
            let _ = self.uffd.unregister(*ptr as *mut libc::c_void, *len);
        }
    }
}
