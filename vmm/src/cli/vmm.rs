//! `vmm`'s command line: its flags, also rendered into its man page and shell completions.

use std::path::PathBuf;

use clap::Parser;

use crate::parse_size;

/// A small KVM VMM for umem: memfd guest RAM, multiboot guests, migration through umemd.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Guest RAM size (e.g. 512M, 1G, 5G; above 3G a second block starts at 4 GiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Back guest RAM with 2 MiB huge pages (hugetlbfs memfd); the host needs that many free in
    /// its pool (/sys/kernel/mm/hugepages/hugepages-2048kB).
    #[arg(long)]
    pub hugepages: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Built-in guest to boot (see --list-guests).
    #[arg(long, conflicts_with = "kernel")]
    pub guest: Option<String>,
    /// Multiboot ELF kernel to boot.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line (guest parameters such as "pages=4096").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Fill all guest RAM with pseudo-random bytes from this seed before loading the kernel.
    #[arg(long)]
    pub prefill: Option<u64>,
    /// With --prefill, fill only this much RAM from the lowest guest address up (e.g. "1G");
    /// the rest stays unpopulated (a sparse guest).
    #[arg(long, value_parser = parse_size, requires = "prefill", value_name = "SIZE")]
    pub prefill_size: Option<u64>,
    /// Control socket path (JSON lines).
    #[arg(long, required_unless_present_any = ["list_guests", "export_guest"])]
    pub control: Option<PathBuf>,
    /// Make the control socket 0660 and owned by this group (name or gid) instead of 0600; the
    /// allow list still decides who is served.
    #[arg(long, value_name = "NAME|GID")]
    pub control_group: Option<String>,
    /// Also serve control clients of this uid (root and the VMM's own uid always are);
    /// repeatable.
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Also serve control clients whose primary group is this one (name or gid); repeatable.
    #[arg(long, value_name = "NAME|GID")]
    pub allow_gid: Vec<String>,
    /// Where guest serial output goes: a file path, "stdout" or "none".
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// umemd's socket.
    #[arg(long, default_value = "/run/umem/umemd.sock")]
    pub umemd: PathBuf,
    /// Receive the VM from a migration listening here: tcp:HOST:PORT (port 0 picks one) between
    /// hosts, or unix:PATH within one host; or "defer", to say where (and with which secret or
    /// TLS credentials) later with the control command migrate-incoming.
    #[arg(long)]
    pub incoming: Option<String>,
    /// The incoming migration's secret, in a file only its owner can read: the source must
    /// prove it knows the same one (its migrate command's secret or secret_file).
    #[arg(long, requires = "incoming")]
    pub incoming_secret_file: Option<PathBuf>,
    /// Run the incoming migration's TCP connections over TLS with the certificates in this
    /// directory (ca-cert.pem, server-cert.pem, server-key.pem; umemd reads them): the source
    /// must present a client certificate of the same CA (its migrate command's tls_creds).
    #[arg(long, requires = "incoming", value_name = "DIR")]
    pub incoming_tls_creds: Option<PathBuf>,
    /// Allow --incoming on a TCP address beyond loopback without any secret or TLS: anybody who
    /// reaches the port could then send this VM its memory and registers.
    #[arg(long, requires = "incoming")]
    pub incoming_insecure: bool,
    /// Do not start the vCPUs (at boot, or after an incoming migration) until "cont".
    #[arg(long, short = 'S')]
    pub paused: bool,
    /// VM name for logs.
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// List the built-in guests and exit.
    #[arg(long)]
    pub list_guests: bool,
    /// Write the --guest image (a multiboot ELF) to this file and exit, e.g. to boot the very
    /// same guest under `qemu-system-x86_64 -kernel`.
    #[arg(long, requires = "guest")]
    pub export_guest: Option<PathBuf>,
}
