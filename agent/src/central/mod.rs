//! Talking to the central API, in either dialect, and the actor that polls it.

pub mod actor;
pub mod client;
pub mod tls;

pub use client::{CentralClient, ClientError, DesiredAnswer};
