//! The three installed commands: their clap definitions, man page sections, and what their man
//! pages add to the options (files, related pages).

use clap::{Command, CommandFactory};

/// One installed command.
pub struct Installed {
    /// The command as clap defines it, for the binary itself.
    pub command: Command,
    /// Man page section: 1 for user commands, 8 for the daemon.
    pub section: &'static str,
    /// FILES entries of the man page: (path, what it is).
    pub files: &'static [(&'static str, &'static str)],
    /// SEE ALSO entries: other pages, as name(section), or installed documents.
    pub see_also: &'static [&'static str],
}

/// Where the package installs the README (the full documentation).
pub const README: &str = "/usr/share/doc/umem/README.md";

/// vmm, umem-ctl and umemd, in that order.
pub fn all() -> Vec<Installed> {
    vec![
        Installed {
            command: vmm::cli::vmm::Args::command(),
            section: "1",
            files: &[(
                "/run/umem/umemd.sock",
                "umemd's socket, where the VMM hands over guest RAM (--umemd)",
            )],
            see_also: &["umem-ctl(1)", "umemd(8)", README],
        },
        Installed {
            command: vmm::cli::umem_ctl::Args::command(),
            section: "1",
            files: &[],
            see_also: &["vmm(1)", "umemd(8)", README],
        },
        Installed {
            command: umemd::cli::Args::command(),
            section: "8",
            files: &[
                (
                    "/etc/default/umemd",
                    "UMEMD_OPTS, options that umemd.service adds to umemd's command line",
                ),
                (
                    "/run/umem/umemd.sock",
                    "the socket VMMs connect to (umemd.socket, or --socket)",
                ),
                (
                    "/usr/lib/systemd/system/umemd.service",
                    "the service; umemd.socket beside it starts it on the first connection",
                ),
            ],
            see_also: &[
                "vmm(1)",
                "umem-ctl(1)",
                "systemd.socket(5)",
                "systemctl(1)",
                README,
            ],
        },
    ]
}

impl Installed {
    pub fn name(&self) -> &str {
        self.command.get_name()
    }
}
