//! `umem-ctl`'s command line: its flags, also rendered into its man page and shell completions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

/// Talk to a vmm control socket.
#[derive(Debug, Parser)]
#[command(
    name = "umem-ctl",
    version,
    after_help = "Any other COMMAND (query-status, stop, cont, quit, migrate-cancel, \
migrate-start-postcopy, migrate-pause, migrate-resume, migrate-recover, migrate-incoming, \
query-migrate, query-migrate-parameters, query-ram-digest) is sent as it is, with its \
arguments as key=value (values are JSON when they parse as JSON, strings otherwise)."
)]
pub struct Args {
    /// The VMM's control socket.
    #[arg(short, long)]
    pub socket: PathBuf,
    /// Print the reply as one JSON line instead of key: value lines.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up after this many seconds (for wait-* commands and connecting).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start an outgoing migration: flags as virsh migrate's, then the URI (tcp:HOST:PORT or
    /// unix:PATH) and any other parameter as key=value.
    Migrate(MigrateArgs),
    /// Change the parameters of the next or the running migration (flags as migrate's, and
    /// key=value).
    MigrateSetParameters(SetParametersArgs),
    /// Poll until the migration ends, showing its progress on stderr (a bar on a terminal).
    WaitMigrate,
    /// Poll until the VM has status STATUS.
    WaitStatus {
        /// running, paused, inmigrate, postmigrate, ...
        status: String,
    },
    #[command(external_subcommand)]
    Other(Vec<String>),
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Allow postcopy (mode=hybrid): precopy first, postcopy once precopy stops converging,
    /// reaches max_rounds or a --timeout-postcopy, or on migrate-start-postcopy.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: switch to postcopy after the first precopy pass
    /// (postcopy_after_rounds=1).
    #[arg(long, requires = "postcopy")]
    pub postcopy_after_precopy: bool,
    #[command(flatten)]
    pub tuning: Tuning,
    /// tcp:HOST:PORT or unix:PATH (or uri=...), and other parameters as key=value.
    pub args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct SetParametersArgs {
    #[command(flatten)]
    pub tuning: Tuning,
    /// Parameters as key=value.
    pub args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct Tuning {
    /// Precopy bandwidth limit in MiB/s (bandwidth_limit).
    #[arg(long, value_name = "MiB/s")]
    pub bandwidth: Option<u64>,
    /// Bandwidth limit of postcopy's background pages in MiB/s (postcopy_bandwidth_limit;
    /// unset, --bandwidth applies).
    #[arg(long, value_name = "MiB/s")]
    pub postcopy_bandwidth: Option<u64>,
    /// Longest precopy, in seconds from the start (precopy_timeout_ms); then what
    /// --timeout-suspend or --timeout-postcopy says, suspend when neither does.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// At --timeout, stop the guest and send the rest (precopy_timeout_action=suspend).
    #[arg(long, requires = "timeout", conflicts_with = "timeout_postcopy")]
    pub timeout_suspend: bool,
    /// At --timeout, switch to postcopy (precopy_timeout_action=postcopy); migrate needs
    /// --postcopy with it.
    #[arg(long, requires = "timeout")]
    pub timeout_postcopy: bool,
    /// Longest migration, in seconds per GiB of guest RAM (completion_timeout_per_gib_s);
    /// past it a migration with --postcopy moves to postcopy, any other is cancelled.
    #[arg(long, value_name = "SECONDS")]
    pub completion_timeout_per_gib: Option<u32>,
}

/// Bytes in a MiB: virsh's bandwidth unit.
const MIB: u64 = 1 << 20;

pub fn parse_args(args: &[String]) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("argument \"{a}\" is not key=value"))?;
        let val = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), val);
    }
    Ok(m)
}

/// Sets `key` from a flag, refusing the same parameter given as key=value too.
fn set_once(m: &mut Map<String, Value>, key: &str, flag: &str, v: Value) -> Result<(), String> {
    if m.contains_key(key) {
        return Err(format!("{flag} and {key}=... both set {key}"));
    }
    m.insert(key.to_string(), v);
    Ok(())
}

impl Tuning {
    /// The parameters the flags and the key=value arguments in `kv` set.
    pub fn parameters(&self, kv: &[String]) -> Result<Map<String, Value>, String> {
        let mut m = parse_args(kv)?;
        let mib = |flag: &str, n: u64| {
            n.checked_mul(MIB)
                .ok_or_else(|| format!("{flag} {n}: too large"))
        };
        if let Some(n) = self.bandwidth {
            let v = json!(mib("--bandwidth", n)?);
            set_once(&mut m, "bandwidth_limit", "--bandwidth", v)?;
        }
        if let Some(n) = self.postcopy_bandwidth {
            let v = json!(mib("--postcopy-bandwidth", n)?);
            set_once(
                &mut m,
                "postcopy_bandwidth_limit",
                "--postcopy-bandwidth",
                v,
            )?;
        }
        if let Some(secs) = self.timeout {
            let ms = secs
                .checked_mul(1000)
                .ok_or_else(|| format!("--timeout {secs}: too large"))?;
            set_once(&mut m, "precopy_timeout_ms", "--timeout", json!(ms))?;
            let action = if self.timeout_postcopy {
                "postcopy"
            } else {
                "suspend"
            };
            set_once(&mut m, "precopy_timeout_action", "--timeout", json!(action))?;
        }
        if let Some(s) = self.completion_timeout_per_gib {
            set_once(
                &mut m,
                "completion_timeout_per_gib_s",
                "--completion-timeout-per-gib",
                json!(s),
            )?;
        }
        Ok(m)
    }
}

impl MigrateArgs {
    /// The `migrate` command's arguments: the URI (tcp:HOST:PORT or unix:PATH, or uri=...),
    /// the flags' parameters and the key=value ones.
    pub fn arguments(&self) -> Result<Value, String> {
        let (uris, kv): (Vec<String>, Vec<String>) = self
            .args
            .iter()
            .cloned()
            .partition(|a| a.starts_with("tcp:") || a.starts_with("unix:"));
        let mut m = self.tuning.parameters(&kv)?;
        match uris.as_slice() {
            [] => {}
            [uri] => set_once(&mut m, "uri", uri, json!(uri))?,
            _ => return Err(format!("more than one URI: {}", uris.join(" "))),
        }
        if !m.contains_key("uri") {
            return Err("migrate needs a URI: tcp:HOST:PORT or unix:PATH".into());
        }
        if self.tuning.timeout_postcopy && !self.postcopy {
            return Err("--timeout-postcopy needs --postcopy: postcopy must be allowed".into());
        }
        if self.postcopy {
            set_once(&mut m, "mode", "--postcopy", json!("hybrid"))?;
            // Without --postcopy-after-precopy no round count moves it to postcopy: only
            // convergence, max_rounds, a time limit or migrate-start-postcopy do.
            let after = if self.postcopy_after_precopy {
                1
            } else {
                u32::MAX
            };
            set_once(&mut m, "postcopy_after_rounds", "--postcopy", json!(after))?;
        }
        Ok(Value::Object(m))
    }
}
