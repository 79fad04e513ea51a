//! `umemd`: the umem migration daemon. One per host; it owns every migration connection, in
//! both roles, for any number of VMs at once.
//!
//! A page's way from the source VM to the destination VM: [`session`] receives the VMM's memfd,
//! [`source`] reads the page through [`mapping`] and streams it, [`dest`] writes it into the
//! destination's memfd.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bitmap;
pub mod daemon;
pub mod dest;
pub mod fault;
pub mod link;
pub mod mapping;
pub mod pages;
pub mod sender;
pub mod session;
pub mod source;
pub mod stream;
