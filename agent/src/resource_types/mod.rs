//! Base resource types: `<dir>/<name>/resource_metadata.json` beside `rootfs.tgz`.
//! A folder whose metadata is unreadable or invalid is skipped with a warning.

pub mod actor;

use std::path::{Path, PathBuf};

use protocol::native::{BaseResourceType, ResourceMetadata};

/// A folder that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub folder: PathBuf,
    pub why: String,
}

/// Reads every type folder under `dir`, sorted by type name. A missing `dir` is no types.
pub fn scan(dir: &Path) -> (Vec<BaseResourceType>, Vec<Skipped>) {
    let mut types = Vec::new();
    let mut skipped = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (types, skipped),
        Err(e) => {
            skipped.push(Skipped {
                folder: dir.to_owned(),
                why: format!("cannot read the resource types folder: {e}"),
            });
            return (types, skipped);
        }
    };
    let mut folders: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    for folder in folders {
        match read_type(&folder) {
            Ok(t) => types.push(t),
            Err(why) => skipped.push(Skipped { folder, why }),
        }
    }
    types.sort_by(|a, b| a.name.cmp(&b.name));
    (types, skipped)
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
        let (types, skipped) = scan(dir.path());
        let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["git", "time"]);
        assert!(types[0].image.ends_with("git/rootfs.tgz"));
        assert_eq!(skipped.len(), 2);
        assert!(skipped.iter().any(|s| s.why.contains("version")));
    }

    #[test]
    fn missing_folder_means_no_types() {
        let (types, skipped) = scan(Path::new("/nonexistent/volume-agent-types"));
        assert!(types.is_empty() && skipped.is_empty());
    }
}
