//! volume-agent: the worker-side daemon.
//!
//! See ARCHITECTURE.md for the bird's-eye view. Each subsystem is a folder; where it has an
//! actor, `actor.rs` sits beside the logic it drives.

pub mod inventory;
pub mod remove;
