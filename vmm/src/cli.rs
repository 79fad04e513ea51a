//! The command lines of the crate's binaries, `vmm` and `umem-ctl`, in the library so that the
//! packaging renders their man pages and shell completions from these very definitions.

pub mod umem_ctl;
pub mod vmm;
