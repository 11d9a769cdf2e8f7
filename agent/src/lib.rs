//! volume-agent: the worker-side daemon.
//!
//! See ARCHITECTURE.md for the bird's-eye view. Each subsystem is a folder; where it has an
//! actor, `actor.rs` sits beside the logic it drives.

pub mod api;
pub mod central;
pub mod cli;
pub mod config;
pub mod contents;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod durable;
pub mod fsx;
pub mod generate;
pub mod inventory;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod outlet;
pub mod peercred;
pub mod planner;
pub mod reconciler;
pub mod remove;
pub mod reporter;
pub mod resource_types;
pub mod usage;
