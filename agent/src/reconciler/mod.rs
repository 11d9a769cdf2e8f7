//! Carrying out the plan: bounded concurrency, a timeout per volume, backoff after
//! failures, children strictly before parents. The rules of *what* to destroy live in
//! [`crate::planner`]; this module only decides *when* to run each destroy.

pub mod actor;
pub mod backoff;
pub mod execute;

pub use actor::{PassReport, ReconcilerActor};
