//! The native dialect of the central API: `/api/v1/workers/{worker}/...`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Handle, VolumeState};

/// Path of the base resource types report for `worker`.
pub fn resource_types_path(worker: &str) -> String {
    format!("/api/v1/workers/{worker}/base-resource-types")
}

/// Path of the desired set for `worker`.
pub fn desired_path(worker: &str) -> String {
    format!("/api/v1/workers/{worker}/volumes/desired")
}

/// Path of the volume report for `worker`.
pub fn report_path(worker: &str) -> String {
    format!("/api/v1/workers/{worker}/volumes/report")
}

/// One base resource type as found in `<dir>/<name>/resource_metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BaseResourceType {
    /// The type's name, e.g. `git`.
    #[serde(rename = "type")]
    pub name: String,
    /// Path of the type's `rootfs.tgz` on the worker.
    pub image: String,
    pub version: String,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub unique_version_history: bool,
}

/// `PUT /api/v1/workers/{worker}/base-resource-types`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceTypesReport {
    pub resource_types: Vec<BaseResourceType>,
}

/// The contents of a type folder's `resource_metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceMetadata {
    #[serde(rename = "type")]
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub unique_version_history: bool,
}

/// A volume the central side wants kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DesiredVolume {
    pub handle: Handle,
    #[serde(default)]
    pub parent: Option<Handle>,
}

/// `GET /api/v1/workers/{worker}/volumes/desired`: 200 body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredSet {
    pub worker: String,
    /// Only grows; a lower revision than the highest applied one is stale.
    pub revision: u64,
    /// The central side's snapshot time (RFC 3339, any fraction of a second).
    pub as_of: DateTime<Utc>,
    /// Volumes to keep.
    pub volumes: Vec<DesiredVolume>,
    /// Volumes to destroy now.
    #[serde(default)]
    pub destroying: Vec<Handle>,
}

/// An entry of [`VolumeReport::volumes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReportedVolume {
    pub handle: Handle,
    pub parent: Option<Handle>,
    pub state: VolumeState,
    /// Real on-disk bytes, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// A volume whose destruction failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailedVolume {
    pub handle: Handle,
    pub error: String,
    pub attempts: u32,
}

/// A volume the central side asked to destroy that still has live children here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BlockedVolume {
    pub handle: Handle,
    pub by_children: Vec<Handle>,
}

/// The volumes filesystem's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskReport {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub free_inodes: u64,
    pub pressure: bool,
    /// The agent's free-space floor (`gc.min_free`) in bytes: `pressure` is true below
    /// it. The central side makes room up to it. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
}

/// `PUT /api/v1/workers/{worker}/volumes/report`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct VolumeReport {
    /// Highest desired-set revision applied, if any.
    pub revision_seen: Option<u64>,
    pub volumes: Vec<ReportedVolume>,
    #[serde(default)]
    pub destroyed: Vec<Handle>,
    #[serde(default)]
    pub failed: Vec<FailedVolume>,
    #[serde(default)]
    pub blocked: Vec<BlockedVolume>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Handle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskReport>,
    /// Set when the mass-destroy guard refused this pass's destroys by absence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Quotes an ETag value for `If-None-Match`, unless it already is quoted.
pub fn quote_etag(tag: &str) -> String {
    if tag.starts_with('"') || tag.starts_with("W/\"") {
        tag.to_string()
    } else {
        format!("\"{tag}\"")
    }
}

/// The map shape of properties on the local API, re-exported for convenience.
pub type Properties = BTreeMap<String, String>;
