//! Compiles the built-in bare-metal test guests (see `guests/README.md`) into
//! `$OUT_DIR/<name>.elf`, which `src/guests.rs` embeds into the binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Guest programs; each is `guests/<name>.c` linked with the common sources.
const GUESTS: &[&str] = &["memtouch", "digest"];

/// Sources linked into every guest.
const COMMON_SOURCES: &[&str] = &["entry.S", "lib.c"];

/// Inputs that are not compiled directly but affect every guest.
const COMMON_INPUTS: &[&str] = &["lib.h", "link.ld"];

/// Freestanding 32-bit code with no runtime: the guests start in protected
/// mode with nothing but the multiboot info and must link at a fixed address.
const CFLAGS: &[&str] = &[
    "-m32",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-nostdlib",
    "-O2",
    "-static",
    "-Wall",
];

/// Link flags; the linker script places everything at 1 MiB.
const LDFLAGS: &[&str] = &[
    "-Wl,-m,elf_i386",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src_dir = manifest_dir.join("guests");

    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    for name in COMMON_SOURCES.iter().chain(COMMON_INPUTS) {
        println!("cargo:rerun-if-changed={}", src_dir.join(name).display());
    }
    for guest in GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            src_dir.join(format!("{guest}.c")).display()
        );
    }

    for guest in GUESTS {
        build_guest(&src_dir, &out_dir, guest);
    }
}

/// `$CC` may carry arguments (for example `ccache gcc`).
fn compiler() -> Vec<String> {
    let cc = env::var("CC").ok().filter(|cc| !cc.trim().is_empty());
    match cc {
        Some(cc) => cc.split_whitespace().map(str::to_owned).collect(),
        None => vec!["cc".to_owned()],
    }
}

fn build_guest(src_dir: &Path, out_dir: &Path, guest: &str) {
    let cc = compiler();
    let output = out_dir.join(format!("{guest}.elf"));

    let mut cmd = Command::new(&cc[0]);
    cmd.args(&cc[1..])
        .args(CFLAGS)
        .arg("-I")
        .arg(src_dir)
        .args(LDFLAGS)
        .arg("-T")
        .arg(src_dir.join("link.ld"))
        .arg("-o")
        .arg(&output);
    for src in COMMON_SOURCES {
        cmd.arg(src_dir.join(src));
    }
    cmd.arg(src_dir.join(format!("{guest}.c")));

    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(
            guest,
            &shown,
            &format!(
                "compiler exited with {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => fail(guest, &shown, &format!("could not run `{}`: {e}", cc[0])),
    }
}

fn fail(guest: &str, command: &str, detail: &str) -> ! {
    eprintln!("error: failed to build the `{guest}` test guest");
    eprintln!("command: {command}");
    eprintln!("{detail}");
    eprintln!(
        "Building the test guests needs gcc with 32-bit code generation (-m32) \
         and binutils (as, ld with elf_i386 support); install them \
         (e.g. `apt-get install gcc binutils`) or set CC to such a compiler."
    );
    exit(1);
}
