//! What can go wrong while writing the generated files.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rendering {what}: {source}")]
    Render {
        what: String,
        source: std::io::Error,
    },
}
