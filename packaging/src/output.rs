//! The layout of the output directory, which the asset list of this crate's Cargo.toml names:
//! man/NAME.SECTION, completions/{bash,zsh,fish}/FILE, default/umemd.

use std::path::Path;

use crate::commands;
use crate::completions;
use crate::defaults;
use crate::error::Error;
use crate::manpages;

/// Writes every file under `out`; returns how many.
pub fn write_all(out: &Path) -> Result<usize, Error> {
    let mut n = 0;
    let installed = commands::all();
    for c in &installed {
        write(
            &out.join("man").join(manpages::file_name(c)),
            &manpages::render(c)?,
        )?;
        n += 1;
        for shell in completions::SHELLS {
            let dir = out.join("completions").join(shell.to_string());
            let file = dir.join(completions::file_name(shell, c.name()));
            write(&file, &completions::render(c, shell))?;
            n += 1;
        }
        if c.name() == "umemd" {
            write(
                &out.join("default").join("umemd"),
                defaults::render(&c.command).as_bytes(),
            )?;
            n += 1;
        }
    }
    Ok(n)
}

fn write(path: &Path, data: &[u8]) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, data).map_err(err)
}
