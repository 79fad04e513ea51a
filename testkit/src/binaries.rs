//! The `vmm` and `umemd` binaries the kit runs: those of the caller's build profile, built
//! first (once per process) so that they are never stale.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// The directory holding `vmm` and `umemd`, building them first (once per process).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("UMEM_E2E_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test>-<hash>, or target/<profile>/<bin> for a binary.
        let parent = exe.parent().expect("executable has a directory");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target/<profile>/deps has a parent")
        } else {
            parent
        }
        .to_path_buf();
        if !std::env::var("UMEM_E2E_NO_BUILD").is_ok_and(|v| v == "1") {
            build_binaries(&dir);
        }
        for b in ["vmm", "umemd"] {
            assert!(
                dir.join(b).is_file(),
                "{} is missing; build it with `cargo build -p vmm -p umemd` for this profile",
                dir.join(b).display()
            );
        }
        dir
    })
}

/// Full path of binary `name` in [`bin_dir`].
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Runs `cargo build -p vmm -p umemd`, in the workspace, for the profile `dir` belongs to.
fn build_binaries(dir: &Path) {
    let profile = dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug")
        .to_string();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // This crate is `testkit/` of the workspace.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lies in the workspace");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "vmm", "-p", "umemd"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // target/<profile> -> target; keeps a custom target directory.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let t0 = Instant::now();
    let status = cmd.status().expect("running cargo build for vmm and umemd");
    assert!(
        status.success(),
        "cargo build -p vmm -p umemd ({profile}) failed: {status}"
    );
    eprintln!(
        "e2e: vmm and umemd ({profile}) up to date after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
