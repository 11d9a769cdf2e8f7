//! Small files that must survive a power cut: written to a temporary name, fsynced,
//! renamed over the old one, and the directory fsynced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// One writer at a time: two writes of the same file (a poll asked for at once under disk
/// pressure racing the timer's, each storing the applied revision) would share the
/// temporary name, and one rename would find it gone.
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Replaces `path` with `contents` durably; the file is private to its owner (0600).
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let _one_writer = WRITING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Removes `path` durably; a missing file is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// fsyncs a directory, so entries created or renamed in it are on disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The highest applied desired-set revision, kept in the state directory.
pub mod revision {
    use super::*;

    pub const FILE: &str = "applied-revision";

    pub fn load(state_dir: &Path) -> io::Result<Option<u64>> {
        match fs::read_to_string(state_dir.join(FILE)) {
            Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: {e}; remove it with `volume-agent gc reset-revision`",
                        state_dir.join(FILE).display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn store(state_dir: &Path, revision: u64) -> io::Result<()> {
        write_atomic(&state_dir.join(FILE), format!("{revision}\n").as_bytes())
    }

    pub fn clear(state_dir: &Path) -> io::Result<()> {
        remove(&state_dir.join(FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_survives_reopen_and_clears() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(revision::load(dir.path()).expect("load"), None);
        revision::store(dir.path(), 42).expect("store");
        revision::store(dir.path(), 43).expect("store");
        assert_eq!(revision::load(dir.path()).expect("load"), Some(43));
        revision::clear(dir.path()).expect("clear");
        assert_eq!(revision::load(dir.path()).expect("load"), None);
    }

    #[test]
    fn written_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        revision::store(dir.path(), 1).expect("store");
        let mode = fs::metadata(dir.path().join(revision::FILE))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn concurrent_stores_of_the_revision_all_succeed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let path = dir.path();
                s.spawn(move || {
                    for i in 0..200 {
                        revision::store(path, t * 1000 + i).expect("store");
                    }
                });
            }
        });
        assert!(revision::load(dir.path()).expect("load").is_some());
    }
}
