//! Volume drivers: how a volume's data directory is made, attached and detached.
//!
//! * `naive`: every volume is a plain directory; a child is a full copy of its parent's data
//!   (`contents::copy`: reflinks where the file system has them; symlinks, permissions,
//!   owners, extended attributes, hard links and special files preserved).
//! * `overlay`: a root is a plain directory; a child is an overlay mount whose lower layers
//!   are its parent chain's layers (the nearest ancestors' `upper/` dirs, ending with the
//!   chain's root `volume/`), with the child's own `upper/` and `work/` beside it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::layout::{DATA_DIR, UPPER_DIR, WORK_DIR};
use super::DriverKind;
use crate::fsx::host;

/// Longest overlay option string the kernel accepts (one page).
const MAX_MOUNT_OPTIONS: usize = 4095;

/// A driver failure, naming the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("making {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: crate::fsx::FsxError,
    },
    #[error("mounting overlay at {target}: {source}; the kernel needs overlayfs and the volumes root must support it (or set driver = \"naive\")")]
    Mount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {target}: {source}; stop whatever still uses the volume and retry")]
    Unmount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("overlay options for {target} are {len} bytes, over the kernel's limit of {MAX_MOUNT_OPTIONS}; the parent chain is too deep for overlay under this volumes root (use a shorter root path or driver = \"naive\")")]
    OptionsTooLong { target: PathBuf, len: usize },
}

/// What a child is made from.
pub(crate) struct ParentView {
    /// The parent's data directory as its users see it (a plain dir or an overlay mount).
    pub(crate) data: PathBuf,
    /// Overlay lower layers for a child of this parent, topmost first.
    pub(crate) layers: Vec<PathBuf>,
}

/// One way of making volumes.
pub(crate) trait Driver: Send + Sync {
    /// Makes the volume directory `dir` (which exists and is empty) ready for data:
    /// `dir/volume` and anything else the driver keeps there.
    fn make(&self, dir: &Path, parent: Option<&ParentView>) -> Result<(), DriverError>;
    /// Makes `dir/volume` show the volume's data (mounts an overlay child). Repeatable.
    /// Returns whether something was mounted.
    fn attach(&self, dir: &Path, layers: Option<&[PathBuf]>) -> Result<bool, DriverError>;
    /// Undoes [`Driver::attach`]. Repeatable; a missing or unmounted dir is fine.
    fn detach(&self, dir: &Path) -> Result<(), DriverError>;
}

pub(crate) struct Naive;
pub(crate) struct Overlay;

pub(crate) fn driver(kind: DriverKind) -> &'static dyn Driver {
    match kind {
        DriverKind::Naive => &Naive,
        DriverKind::Overlay => &Overlay,
    }
}

fn mkdir(p: &Path) -> Result<(), DriverError> {
    fs::create_dir(p).map_err(|source| DriverError::Io {
        path: p.to_owned(),
        source,
    })
}

impl Driver for Naive {
    fn make(&self, dir: &Path, parent: Option<&ParentView>) -> Result<(), DriverError> {
        let data = dir.join(DATA_DIR);
        match parent {
            None => mkdir(&data),
            Some(p) => crate::contents::copy::copy_tree(&p.data, &data)
                .map(drop)
                .map_err(|e| DriverError::Copy {
                    from: p.data.clone(),
                    to: data.clone(),
                    source: e,
                }),
        }
    }
    fn attach(&self, _dir: &Path, _layers: Option<&[PathBuf]>) -> Result<bool, DriverError> {
        Ok(false)
    }
    fn detach(&self, _dir: &Path) -> Result<(), DriverError> {
        Ok(())
    }
}

impl Driver for Overlay {
    fn make(&self, dir: &Path, parent: Option<&ParentView>) -> Result<(), DriverError> {
        mkdir(&dir.join(DATA_DIR))?;
        if parent.is_some() {
            mkdir(&dir.join(UPPER_DIR))?;
            mkdir(&dir.join(WORK_DIR))?;
        }
        Ok(())
    }
    fn attach(&self, dir: &Path, layers: Option<&[PathBuf]>) -> Result<bool, DriverError> {
        let Some(layers) = layers else {
            return Ok(false);
        };
        let target = dir.join(DATA_DIR);
        if host::is_mount_point(&target) {
            return Ok(false);
        }
        let options = overlay_options(layers, &dir.join(UPPER_DIR), &dir.join(WORK_DIR));
        if options.len() > MAX_MOUNT_OPTIONS {
            return Err(DriverError::OptionsTooLong {
                target,
                len: options.len(),
            });
        }
        host::mount_overlay(&target, &options)
            .map_err(|source| DriverError::Mount { target, source })?;
        Ok(true)
    }
    fn detach(&self, dir: &Path) -> Result<(), DriverError> {
        let target = dir.join(DATA_DIR);
        if !host::is_mount_point(&target) {
            return Ok(());
        }
        host::unmount(&target).map_err(|source| DriverError::Unmount { target, source })
    }
}

/// Escapes the characters overlayfs treats specially in a layer path.
fn escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn overlay_options(layers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lower: Vec<String> = layers.iter().map(|l| escape(l)).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        escape(upper),
        escape(work)
    )
}

/// Whether overlay mounts work under `root` (mounts and unmounts a scratch overlay).
pub(crate) fn overlay_works(root: &Path) -> bool {
    let probe = root.join(format!(".overlay-probe-{}", std::process::id()));
    let result = (|| -> io::Result<()> {
        for d in ["lower", "upper", "work", "merged"] {
            fs::create_dir_all(probe.join(d))?;
        }
        let opts = overlay_options(
            &[probe.join("lower")],
            &probe.join("upper"),
            &probe.join("work"),
        );
        host::mount_overlay(&probe.join("merged"), &opts)?;
        host::unmount(&probe.join("merged"))
    })();
    if let Err(e) = &result {
        tracing::info!(root = %root.display(), error = %e, "overlay mounts do not work under the volumes root; using the naive driver");
    }
    let _ = host::unmount(&probe.join("merged"));
    let _ = crate::remove::remove_tree(&probe);
    result.is_ok()
}
