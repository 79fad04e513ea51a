//! `umem-fuzz`: a fuzzer that runs on stable Rust for a bounded time, so that CI can run it on
//! every change (cargo-fuzz needs a nightly toolchain).
//!
//! Targets ([`targets`]) take a byte stream of frames: every decoder of `proto`, and the
//! destination umemd placing page runs, zero runs, holes and discards into a real memfd. Inputs
//! come from the `arbitrary` crate building messages field by field ([`generate`]) and from
//! byte-level mutation of kept inputs ([`mutate`]); an input that shows an outcome not seen
//! before is kept ([`engine`]). A global allocator counts what each decode allocates
//! ([`alloc`]).
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod engine;
pub mod generate;
pub mod mutate;
pub mod targets;
