//! Names of directory entries: one component, never `.`/`..`, never a path.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A borrowed entry name: not empty, not `.` or `..`, no `/`, no NUL.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Name<'a>(&'a CStr);

/// An owned [`Name`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameBuf(CString);

fn check(bytes: &[u8]) -> Result<(), io::Error> {
    let why = match bytes {
        b"" => "an empty name",
        b"." | b".." => "`.` or `..`",
        _ if bytes.contains(&b'/') => "a name with `/` in it",
        _ if bytes.contains(&0) => "a name with a NUL byte in it",
        _ => return Ok(()),
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{why} ({:?}) is not one directory entry; give a single file name",
            String::from_utf8_lossy(bytes)
        ),
    ))
}

impl<'a> Name<'a> {
    /// Checks `name` is a single entry name.
    pub fn new(name: &'a CStr) -> io::Result<Name<'a>> {
        check(name.to_bytes())?;
        Ok(Name(name))
    }

    /// A name known to be valid (from `getdents`, minus `.` and `..`).
    pub(crate) fn trusted(name: &'a CStr) -> Name<'a> {
        debug_assert!(check(name.to_bytes()).is_ok());
        Name(name)
    }

    pub fn as_c_str(&self) -> &'a CStr {
        self.0
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0.to_bytes()
    }

    pub fn as_os_str(&self) -> &'a OsStr {
        OsStr::from_bytes(self.0.to_bytes())
    }

    pub fn as_path(&self) -> &'a Path {
        Path::new(self.as_os_str())
    }

    pub fn to_owned(&self) -> NameBuf {
        NameBuf(self.0.to_owned())
    }
}

impl NameBuf {
    /// Checks `name` is a single entry name.
    pub fn new(name: impl AsRef<[u8]>) -> io::Result<NameBuf> {
        let bytes = name.as_ref();
        check(bytes)?;
        CString::new(bytes)
            .map(NameBuf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    pub fn as_name(&self) -> Name<'_> {
        Name(&self.0)
    }
}

impl fmt::Debug for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_os_str(), f)
    }
}

impl fmt::Debug for NameBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.as_name(), f)
    }
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.as_path().display(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_anything_but_one_component() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(NameBuf::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in [&b"a"[..], b"...", b".hidden", b"a b", b"\xff"] {
            assert!(NameBuf::new(good).is_ok(), "{good:?} refused");
        }
    }
}
