//! `umem-packaging`: writes the files of the Debian package that are not built by cargo: the man
//! pages and shell completions of `vmm`, `umem-ctl` and `umemd`, and `/etc/default/umemd`, all
//! rendered from the binaries' own clap definitions (`vmm::cli`, `umemd::cli`) so that they
//! cannot drift from the flags. `scripts/package.sh` runs it, then `cargo deb`, whose asset list
//! (this crate's Cargo.toml) picks the files up.
#![warn(clippy::undocumented_unsafe_blocks)]

mod commands;
mod completions;
mod defaults;
mod error;
mod manpages;
mod output;

use std::path::PathBuf;

use clap::Parser;

/// Render umem's man pages, shell completions and /etc/default/umemd into a directory.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to write man/, completions/ and default/ (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn main() {
    let args = Args::parse();
    match output::write_all(&args.out) {
        Ok(files) => println!("wrote {files} files under {}", args.out.display()),
        Err(e) => {
            eprintln!("umem-packaging: {e}");
            std::process::exit(1);
        }
    }
}
