//! `umemd`: the umem migration daemon. One per host; it owns every migration connection, in
//! both roles, for any number of VMs at once.
//!
//! A page's way from the source VM to the destination VM: [`session`] receives the VMM's memfd,
//! [`source`] reads the page through [`mapping`] and streams it, [`dest`] writes it into the
//! destination's memfd. The two roles share only the modules at this level ([`link`],
//! [`stream`], [`mapping`], [`layout`], [`bitmap`], [`stats`], [`priority`], [`error`],
//! [`phase`]); neither imports the other. [`daemon`] and [`admission`] decide which local
//! clients get a [`session`] at all; [`metrics`] shows what the sessions report.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod admission;
pub mod auth;
pub mod bitmap;
pub mod cli;
pub mod congestion;
pub mod daemon;
pub mod dest;
pub mod error;
pub mod layout;
pub mod link;
pub mod mapping;
pub mod metrics;
pub mod phase;
pub mod priority;
pub mod session;
pub mod source;
pub mod stats;
pub mod stream;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod wake;
