//! Wire types of volume-agent, with no I/O.
//!
//! * [`native`]: the agent's own dialect of the central API (desired set with revisions,
//!   reports, base resource types).
//! * [`concourse`]: the endpoints a Concourse ATC already serves.
//! * [`local`]: the worker-local volume API, shaped like baggageclaim's.
//! * [`metrics`]: the Prometheus exposition both binaries serve (encoding only).
//! * [`settings`]: both binaries' configuration: TOML, environment overrides, errors that
//!   name the key or the variable.
//!
//! Everything that arrives from outside is validated while it is deserialized: a
//! [`Handle`] that is not 1–128 characters of `[A-Za-z0-9._-]` never exists as a value.
//! Use [`decode`] to get errors that name the offending field.

pub mod concourse;
pub mod handle;
pub mod local;
pub mod metrics;
pub mod native;
pub mod openapi;
pub mod settings;
pub mod state;

pub use handle::{Handle, HandleError};
pub use state::VolumeState;

/// A JSON document that could not be turned into the expected type.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what}: field `{path}`: {message}")]
pub struct DecodeError {
    /// What was being decoded, e.g. "desired set".
    pub what: &'static str,
    /// Path of the offending field (`volumes[2].handle`), `.` for the document itself.
    pub path: String,
    /// serde's description of the problem.
    pub message: String,
}

/// Decodes `bytes` as JSON into `T`, naming the offending field on error.
///
/// `what` describes the document for the message ("desired set", "report").
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // serde_json appends " at line L column C"; the field path says more.
        let mut message = inner.to_string();
        if let Some(idx) = message.rfind(" at line ") {
            message.truncate(idx);
        }
        DecodeError {
            what,
            path,
            message,
        }
    })
}
