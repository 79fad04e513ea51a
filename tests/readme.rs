//! The README shows each command's `--help` as the binary prints it: a flag added, renamed or
//! reworded without the README following fails here, naming the command and the first line
//! that differs.

use std::process::Command;

use umem_testkit::binary;

/// The ```-fenced block right after the heading `heading` of README.md.
fn block_after(readme: &str, heading: &str) -> String {
    let at = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    let rest = &readme[at..];
    let start = rest
        .find("```\n")
        .expect("a fenced block after the heading")
        + 4;
    let len = rest[start..].find("```\n").expect("the block's end");
    rest[start..start + len].to_string()
}

#[test]
fn the_readme_shows_every_commands_help_as_printed() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("reading README.md");
    for bin in ["vmm", "umemd", "umem-ctl"] {
        let out = Command::new(binary(bin))
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("running {bin} --help: {e}"));
        assert!(out.status.success(), "{bin} --help failed");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let shown = block_after(&readme, &format!("### `{bin}`"));
        if printed != shown {
            let (n, (p, s)) = printed
                .lines()
                .zip(shown.lines())
                .enumerate()
                .find(|(_, (p, s))| p != s)
                .unwrap_or((
                    printed.lines().count().min(shown.lines().count()),
                    ("(end)", "(end)"),
                ));
            panic!(
                "README.md's help of {bin} differs from `{bin} --help` at line {}:\n  README:  {s}\n  printed: {p}\nPaste the output of `target/release/{bin} --help` into README.md.",
                n + 1
            );
        }
    }
}
