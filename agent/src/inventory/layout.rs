//! Where volumes live under the volumes root.
//!
//! ```text
//! <root>/init/<handle>/        a volume being created (never handed out)
//! <root>/live/<handle>/        a volume that exists
//! <root>/dead/<handle>/        a volume being destroyed
//! <root>/quarantine/<handle>.<unix-seconds>/   a directory found without a record
//! each volume directory:
//!     volume/      the data directory (VolumeRecord::path); an overlay mount for overlay children
//!     upper/ work/ overlay children only: the child's own layer and overlay's work dir
//!     meta.json    the volume's metadata, so the inventory can be rebuilt from disk
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use protocol::Handle;

pub(crate) const LIVE_DIR: &str = "live";
pub(crate) const DATA_DIR: &str = "volume";
pub(crate) const UPPER_DIR: &str = "upper";
pub(crate) const WORK_DIR: &str = "work";
pub(crate) const META_FILE: &str = "meta.json";

/// Mode of the volumes root and the state directory: only root may look inside (a
/// privileged volume's setuid files would otherwise be reachable by every local user).
pub(crate) const PRIVATE_DIR: u32 = 0o700;
/// Mode of the agent's metadata files.
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Sets `dir` to [`PRIVATE_DIR`], whatever it was.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR))
}

/// Creates (truncating) a metadata file with mode [`PRIVATE_FILE`]; an existing file is
/// set to that mode too.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    Ok(f)
}

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout { root }
    }
    pub(crate) fn init_dir(&self) -> PathBuf {
        self.root.join("init")
    }
    pub(crate) fn live_dir(&self) -> PathBuf {
        self.root.join(LIVE_DIR)
    }
    pub(crate) fn dead_dir(&self) -> PathBuf {
        self.root.join("dead")
    }
    pub(crate) fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    pub(crate) fn init(&self, h: &Handle) -> PathBuf {
        self.init_dir().join(h.as_str())
    }
    pub(crate) fn live(&self, h: &Handle) -> PathBuf {
        self.live_dir().join(h.as_str())
    }
    pub(crate) fn dead(&self, h: &Handle) -> PathBuf {
        self.dead_dir().join(h.as_str())
    }
    /// The data directory of a live volume (what callers mount).
    pub(crate) fn data(&self, h: &Handle) -> PathBuf {
        self.live(h).join(DATA_DIR)
    }

    /// Makes the four top-level directories.
    pub(crate) fn ensure(&self) -> io::Result<()> {
        for d in [
            self.init_dir(),
            self.live_dir(),
            self.dead_dir(),
            self.quarantine_dir(),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        fsync_dir(&self.root)
    }

    /// Names of the entries of `dir` (non-UTF-8 names are returned lossily).
    pub(crate) fn entries(dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }
}

/// Makes a directory entry change (create, rename, unlink) in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether something (file, dir, or dangling link) exists at `p`.
pub(crate) fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
