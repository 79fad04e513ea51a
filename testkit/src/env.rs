//! One test's context: tests run one at a time, each in a fresh temporary directory that is
//! kept (with a dump of the logs) when it fails; and whether this machine can run a VM at all.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::binaries::bin_dir;
use crate::process::tail;
use crate::umemd::{Umemd, UmemdBuilder};
use crate::vmm::VmmBuilder;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test's context: holds the process-wide lock (tests run one at a time) and owns a fresh
/// temporary directory for sockets, logs and serial output.
pub struct TestEnv {
    name: String,
    dir: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

impl TestEnv {
    /// Takes the lock, makes sure the binaries are built and creates the directory.
    pub fn new(name: &str) -> TestEnv {
        let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "umem-e2e-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        eprintln!("e2e {name}: directory {}", dir.display());
        TestEnv {
            name: name.into(),
            dir,
            _lock: lock,
        }
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a umemd named `name` (socket `<dir>/<name>.sock`).
    pub fn umemd(&self, name: &str) -> Umemd {
        Umemd::start(&self.dir, name)
    }

    /// Writes `secret` to a file `name` of this test, readable by its owner only, as a secret
    /// file must be.
    pub fn secret_file(&self, name: &str, secret: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        std::io::Write::write_all(&mut f, secret.as_bytes()).expect("writing the secret");
        path
    }

    /// A builder for a umemd named `name`, for arguments or a user of its own.
    pub fn umemd_builder(&self, name: &str) -> UmemdBuilder {
        UmemdBuilder::new(&self.dir, name)
    }

    /// A builder for a vmm named `name` that talks to `umemd`.
    pub fn vmm(&self, name: &str, umemd: &Umemd) -> VmmBuilder {
        VmmBuilder::new(&self.dir, name, umemd.socket())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Processes are dropped before the environment (declared later), so logs are complete.
        if std::thread::panicking() {
            eprintln!(
                "e2e {}: FAILED; logs and serial output kept in {}",
                self.name,
                self.dir.display()
            );
            dump_logs(&self.dir);
        } else if std::env::var("UMEM_E2E_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("e2e {}: kept {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Prints the last lines of every `.log` file in `dir`.
fn dump_logs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.extension().is_some_and(|e| e == "log") {
            eprintln!("----- {} (last 30 lines)", p.display());
            eprintln!(
                "{}",
                tail(&std::fs::read_to_string(&p).unwrap_or_default(), 30)
            );
        }
    }
}

/// Returns true when `/dev/kvm` can be opened. Otherwise prints `SKIP <test>: /dev/kvm not
/// available` and returns false, or panics when `UMEM_REQUIRE_KVM=1`.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("UMEM_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: /dev/kvm not available ({e}) and UMEM_REQUIRE_KVM=1");
            }
            println!("SKIP {test}: /dev/kvm not available");
            false
        }
    }
}

/// True if the host's pool has `pages` free 2 MiB huge pages, raising the pool if it can;
/// otherwise prints a skip line and returns false, or panics where `UMEM_REQUIRE_KVM=1` (the
/// machines that run CI must have them; run as root there, this raises the pool itself).
/// Free means free and not reserved for a mapping already, which a new one cannot have.
pub fn require_huge_pages(test: &str, pages: u64) -> bool {
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let free = || read("free_hugepages").saturating_sub(read("resv_hugepages"));
    // By the whole count, not the shortfall, and a few times: tests running beside may raise
    // the pool at the same moment, or take what was added.
    for _ in 0..5 {
        if free() >= pages {
            return true;
        }
        let _ = std::fs::write(
            format!("{dir}/nr_hugepages"),
            (read("nr_hugepages") + pages).to_string(),
        );
    }
    let free = free();
    if free >= pages {
        return true;
    }
    let why = format!("{free} free 2 MiB huge pages of the {pages} it needs ({dir})");
    if std::env::var("UMEM_REQUIRE_KVM").is_ok_and(|v| v == "1") {
        panic!("{test}: {why} and UMEM_REQUIRE_KVM=1");
    }
    println!("SKIP {test}: {why}");
    false
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound and released again).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr").port()
}
