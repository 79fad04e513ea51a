//! `umem-ctl`'s command line: its flags, also rendered into its man page and shell completions.

use std::path::PathBuf;

use clap::Parser;

/// Talk to a vmm control socket.
#[derive(Debug, Parser)]
#[command(name = "umem-ctl", version, trailing_var_arg = true)]
pub struct Args {
    /// The VMM's control socket.
    #[arg(short, long)]
    pub socket: PathBuf,
    /// Print the reply as one JSON line instead of key: value lines.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds (for wait-* commands and connecting).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// A control command (query-status, stop, cont, quit, migrate, migrate-cancel,
    /// migrate-start-postcopy, migrate-pause, migrate-resume, migrate-recover, migrate-incoming,
    /// migrate-set-parameters, query-migrate, query-migrate-parameters, query-ram-digest), or
    /// wait-migrate (poll until the migration ends, printing progress), or wait-status STATUS.
    pub command: String,
    /// Arguments as key=value (values are JSON when they parse as JSON, strings otherwise).
    pub args: Vec<String>,
}
