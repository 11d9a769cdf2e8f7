//! Telling the central side what the worker has and what it destroyed.

pub mod actor;
pub mod pending;

pub use actor::ReporterActor;
