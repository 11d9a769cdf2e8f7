//! Base resource types: `<dir>/<name>/resource_metadata.json` beside `rootfs.tgz`.
//! A folder whose metadata is unreadable or invalid is skipped with a warning; one that was
//! read before keeps its last good entry until the folder itself goes, so a half-written
//! metadata file never tells the central side that the type is gone (which would make
//! every volume of the type garbage).

pub mod actor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::native::{BaseResourceType, ResourceMetadata};

/// A folder that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub folder: PathBuf,
    pub why: String,
}

/// The types read in one scan, by folder.
pub type Found = BTreeMap<PathBuf, BaseResourceType>;

/// One look at the resource types folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// Folders whose metadata was read.
    pub found: Found,
    /// Folders present but unreadable or invalid now.
    pub skipped: Vec<Skipped>,
    /// The folder itself could not be listed: this scan says nothing about any type.
    pub unlisted: bool,
}

/// Reads every type folder under `dir`. A missing `dir` is no types.
pub fn scan(dir: &Path) -> Scan {
    let mut out = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.unlisted = true;
            out.skipped.push(Skipped {
                folder: dir.to_owned(),
                why: format!("cannot list the resource types folder: {e}; fix its permissions"),
            });
            return out;
        }
    };
    for folder in entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
    {
        match read_type(&folder) {
            Ok(t) => {
                out.found.insert(folder, t);
            }
            Err(why) => out.skipped.push(Skipped { folder, why }),
        }
    }
    out.skipped.sort_by(|a, b| a.folder.cmp(&b.folder));
    out
}

/// The types to report after `scan`, given the ones reported before: what the scan read,
/// plus the last good entry of every folder that is still there but could not be read this
/// time. A scan that could not list the folder at all changes nothing. Pure.
pub fn carry_forward(previous: &Found, scan: &Scan) -> Found {
    if scan.unlisted {
        return previous.clone();
    }
    let mut next = scan.found.clone();
    for s in &scan.skipped {
        if let Some(old) = previous.get(&s.folder) {
            next.insert(s.folder.clone(), old.clone());
        }
    }
    next
}

/// The report's list: sorted by type name (then image, for two folders of one name).
pub fn listed(found: &Found) -> Vec<BaseResourceType> {
    let mut types: Vec<BaseResourceType> = found.values().cloned().collect();
    types.sort_by(|a, b| (&a.name, &a.image).cmp(&(&b.name, &b.image)));
    types
}

fn read_type(folder: &Path) -> Result<BaseResourceType, String> {
    let meta_path = folder.join("resource_metadata.json");
    let bytes = std::fs::read(&meta_path)
        .map_err(|e| format!("cannot read {}: {e}", meta_path.display()))?;
    let meta: ResourceMetadata = protocol::decode("resource_metadata.json", &bytes)
        .map_err(|e| format!("{}: {e}", meta_path.display()))?;
    if meta.name.trim().is_empty() || meta.version.trim().is_empty() {
        return Err(format!(
            "{}: `type` and `version` must not be empty",
            meta_path.display()
        ));
    }
    let image = folder.join("rootfs.tgz");
    Ok(BaseResourceType {
        name: meta.name,
        image: image.to_string_lossy().into_owned(),
        version: meta.version,
        privileged: meta.privileged,
        unique_version_history: meta.unique_version_history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_type(dir: &Path, folder: &str, json: &str) {
        let d = dir.join(folder);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("resource_metadata.json"), json).expect("write");
        std::fs::write(d.join("rootfs.tgz"), b"").expect("write");
    }

    #[test]
    fn reads_types_and_skips_invalid_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_type(
            dir.path(),
            "git",
            r#"{"type":"git","version":"1.17.0","privileged":false,"unique_version_history":false}"#,
        );
        write_type(dir.path(), "time", r#"{"type":"time","version":"1.2"}"#);
        write_type(dir.path(), "broken", "{not json");
        write_type(dir.path(), "noversion", r#"{"type":"x"}"#);
        let scan = scan(dir.path());
        let types = listed(&scan.found);
        let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["git", "time"]);
        assert!(types[0].image.ends_with("git/rootfs.tgz"));
        assert_eq!(scan.skipped.len(), 2);
        assert!(scan.skipped.iter().any(|s| s.why.contains("version")));
    }

    #[test]
    fn missing_folder_means_no_types() {
        let scan = scan(Path::new("/nonexistent/volume-agent-types"));
        assert!(scan.found.is_empty() && scan.skipped.is_empty() && !scan.unlisted);
    }

    #[test]
    fn half_written_metadata_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_type(dir.path(), "git", r#"{"type":"git","version":"1.0"}"#);
        let before = carry_forward(&Found::new(), &scan(dir.path()));
        std::fs::write(
            dir.path().join("git/resource_metadata.json"),
            r#"{"type":"gi"#,
        )
        .expect("truncate");
        let during = carry_forward(&before, &scan(dir.path()));
        assert_eq!(during, before, "an unreadable file is not a removed type");
        write_type(dir.path(), "git", r#"{"type":"git","version":"2.0"}"#);
        let after = carry_forward(&during, &scan(dir.path()));
        assert_eq!(listed(&after)[0].version, "2.0");
    }

    #[test]
    fn a_removed_type_folder_is_no_longer_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_type(dir.path(), "git", r#"{"type":"git","version":"1.0"}"#);
        write_type(dir.path(), "time", r#"{"type":"time","version":"1.0"}"#);
        let before = carry_forward(&Found::new(), &scan(dir.path()));
        std::fs::remove_dir_all(dir.path().join("git")).expect("rm");
        let after = carry_forward(&before, &scan(dir.path()));
        let names: Vec<String> = listed(&after).into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["time"]);
    }

    #[test]
    fn an_unlistable_folder_changes_nothing() {
        let mut previous = Found::new();
        previous.insert(
            PathBuf::from("/types/git"),
            BaseResourceType {
                name: "git".into(),
                image: "/types/git/rootfs.tgz".into(),
                version: "1.0".into(),
                privileged: false,
                unique_version_history: false,
            },
        );
        let failed = Scan {
            unlisted: true,
            ..Scan::default()
        };
        assert_eq!(carry_forward(&previous, &failed), previous);
    }
}
