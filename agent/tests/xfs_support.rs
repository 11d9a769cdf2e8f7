//! An xfs loop image for the tests that need xfs (reflinks, its ordered log): made and
//! mounted under a temporary directory, unmounted when dropped.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An xfs loop image with reflinks, mounted at `mnt`, unmounted when dropped.
pub struct XfsImage {
    pub image: PathBuf,
    pub mnt: PathBuf,
}

impl XfsImage {
    pub fn make(base: &Path) -> Result<XfsImage, String> {
        let image = base.join("xfs.img");
        let mnt = base.join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        File::create(&image)
            .and_then(|f| f.set_len(512 << 20))
            .map_err(|e| e.to_string())?;
        run("mkfs.xfs", &["-q", "-m", "reflink=1", path(&image)])?;
        let x = XfsImage { image, mnt };
        x.mount()?;
        Ok(x)
    }

    pub fn mount(&self) -> Result<(), String> {
        run("mount", &["-o", "loop", path(&self.image), path(&self.mnt)])
    }

    pub fn unmount(&self) -> Result<(), String> {
        run("umount", &[path(&self.mnt)])
    }
}

impl Drop for XfsImage {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

pub fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd}: {e}")),
    }
}
