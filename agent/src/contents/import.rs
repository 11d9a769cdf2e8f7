//! The `import` strategy: a new volume filled from a directory or a `.tgz` on the worker.
//!
//! The import path itself is followed, as baggageclaim's `os.Stat` does: it is the
//! operator's (the worker's runtime) to name, and [`source`] is the one place it is judged.
//! Below it, entries are walked fd-relative ([`super::copy::copy_into`]). With
//! `follow_symlinks: false` links are copied as links. With `follow_symlinks: true` a link
//! is followed only while it stays beneath the import directory: the kernel resolves it
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` relative to the
//! import directory's handle, so neither `..`, an absolute target, a directory swapped for a
//! link meanwhile, nor a mount can lead it outside; a link that would is refused with an
//! error naming it (baggageclaim would copy whatever it points at on the host). Another
//! file system mounted below the import directory stops the import with an error naming
//! it, as it would stop any walk of a volume.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::fsx::{self, Dir};

use super::copy::{copy_into, CopyStats};
use super::IdMap;

/// What an import copies from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    Tgz(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "import path {path}: {reason}; import a directory or a .tgz file that exists on the worker"
    )]
    Source { path: String, reason: String },
    #[error("importing {path}: {source}")]
    Copy {
        path: PathBuf,
        #[source]
        source: fsx::FsxError,
    },
    #[error("importing {path}: {reason}")]
    Archive { path: PathBuf, reason: String },
}

/// Judges the import path of a create request (followed, as baggageclaim's `os.Stat`).
/// The single place an import source is accepted: a check of allowed import roots belongs
/// here.
pub fn source(path: &str) -> Result<Source, ImportError> {
    let bad = |reason: String| ImportError::Source {
        path: path.to_owned(),
        reason,
    };
    let p = PathBuf::from(path);
    match fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(Source::Dir(p)),
        Ok(m) if m.is_file() => Ok(Source::Tgz(p)),
        Ok(_) => Err(bad("neither a directory nor a .tgz file".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Fills the new volume's data root `data` (owned by the volume's root first, as
/// baggageclaim does) from `source`; everything written is on stable storage when it
/// returns.
pub fn import(
    source: &Source,
    data: &Path,
    follow_symlinks: bool,
    ids: IdMap,
) -> Result<CopyStats, ImportError> {
    let copy_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImportError::Copy { path, source }
    };
    let dest = Dir::open_root(data).map_err(copy_err(data))?;
    ids.own_root(&dest).map_err(copy_err(data))?;
    match source {
        Source::Dir(p) => {
            let src = Dir::open_host(p).map_err(copy_err(p))?;
            copy_into(&src, dest, follow_symlinks, ids).map_err(copy_err(p))
        }
        Source::Tgz(p) => {
            let archive_err = |reason: String| ImportError::Archive {
                path: p.clone(),
                reason,
            };
            let file = fs::File::open(p).map_err(|e| archive_err(e.to_string()))?;
            // The worker's own file (not a caller's stream): device nodes are kept as
            // before, whatever the volume's privilege, and no stream limit applies.
            let opts = super::archive::ExtractOptions {
                ids,
                devices: true,
                max_bytes: None,
                max_entries: None,
            };
            super::archive::extract_compressed(
                &dest,
                &[],
                BufReader::new(file),
                super::archive::Encoding::Gzip,
                &opts,
            )
            .map_err(|e| archive_err(e.to_string()))?;
            // The extractor does not sync as it writes: every file and directory of the
            // new volume now, file by file (nothing else writes into a volume being made).
            super::sync::sync_tree(&dest).map_err(copy_err(data))?;
            Ok(CopyStats::default())
        }
    }
}
