//! Everything that reads or writes a volume's contents. Reached only through
//! [`crate::inventory::Inventory`] methods, which hold the volume while the work runs.
//!
//! Invariant: every walk of a volume tree here is relative to open directory handles
//! (`O_NOFOLLOW`, `*at` calls): no path inside a volume is ever resolved again.

pub mod archive;
