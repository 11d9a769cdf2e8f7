//! Volume handles: the only names that ever become paths.

use std::fmt;

/// Longest handle accepted, in bytes (all handle characters are ASCII).
pub const MAX_HANDLE_LEN: usize = 128;

/// A validated volume handle: 1–128 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// Validation happens in [`Handle::new`] and while deserializing, so a `Handle` is always
/// safe to join onto a directory path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Handle(String);

/// Why a string is not a [`Handle`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("handle is empty; use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    Empty,
    #[error("handle is {0} characters long; the limit is 128")]
    TooLong(usize),
    #[error("handle {0:?} contains {1:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar(String, char),
    #[error("handle {0:?} is reserved; `.` and `..` are path components")]
    Reserved(String),
}

impl Handle {
    /// Validates `s` as a handle.
    pub fn new(s: impl Into<String>) -> Result<Self, HandleError> {
        let s = s.into();
        if s.is_empty() {
            return Err(HandleError::Empty);
        }
        if s.len() > MAX_HANDLE_LEN {
            return Err(HandleError::TooLong(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            let shown: String = s.chars().take(40).collect();
            return Err(HandleError::BadChar(shown, c));
        }
        if s == "." || s == ".." {
            return Err(HandleError::Reserved(s));
        }
        Ok(Handle(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Handle {
    type Error = HandleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Handle::new(s)
    }
}

impl std::str::FromStr for Handle {
    type Err = HandleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Handle::new(s)
    }
}

impl From<Handle> for String {
    fn from(h: Handle) -> String {
        h.0
    }
}

impl AsRef<str> for Handle {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Handle {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl utoipa::PartialSchema for Handle {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_HANDLE_LEN))
            .pattern(Some("^[A-Za-z0-9._-]{1,128}$"))
            .description(Some("Volume handle; `.` and `..` are refused."))
            .into()
    }
}

impl utoipa::ToSchema for Handle {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_handle_alphabet() {
        for ok in ["a", "a1.b_c-d", "...", "0", &"x".repeat(128)] {
            assert!(Handle::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_paths_and_reserved_names() {
        assert_eq!(Handle::new(""), Err(HandleError::Empty));
        assert_eq!(Handle::new("x".repeat(129)), Err(HandleError::TooLong(129)));
        assert!(matches!(Handle::new("."), Err(HandleError::Reserved(_))));
        assert!(matches!(Handle::new(".."), Err(HandleError::Reserved(_))));
        for bad in ["a/b", "../x", "/etc", "a b", "é", "a\0"] {
            assert!(
                matches!(Handle::new(bad), Err(HandleError::BadChar(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_bad_handle_while_deserializing() {
        let err = serde_json::from_str::<Handle>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("only A-Z"), "{err}");
    }
}
