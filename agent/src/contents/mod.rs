//! Everything that touches a volume's contents, used only through [`Inventory`] methods
//! that run under the volume's lock with its state checked inside
//! (`inventory/contents_ops.rs`).
//!
//! * `ids`: how an unprivileged volume stores root (baggageclaim's id mapping).
//! * `copy`: the naive driver's copy-on-write copy and the import of a host directory.
//! * `shift`: the owner shift when a volume's privilege changes.
//! * `import`: the `import` strategy (a host directory or a `.tgz`).
//! * `archive`: tar extract and pack for stream-in/out (`inventory/streams.rs`).
//! * `sync`: durability of what was written, file by file, never a `syncfs`.
//!
//! All of it but `archive` walks trees through [`crate::fsx`] only: fd-relative, never
//! following a symlink inside a volume, never leaving the volume's mount. `archive` keeps
//! its own fd-relative `*at` calls (`O_NOFOLLOW`, one open directory per level) until it
//! moves onto `fsx` too.
//!
//! [`Inventory`]: crate::inventory::Inventory

pub mod archive;
pub mod copy;
pub mod ids;
pub mod import;
pub mod shift;
pub mod sync;

pub use ids::{parse_max_id, IdMap};
