//! The worker-local volume API, shaped like Concourse's baggageclaim so its Go client can
//! drive it unchanged.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::native::Properties;
use crate::{Handle, VolumeState};

/// How a volume's contents come to be. Unknown fields are ignored, as Go's decoder does:
/// newer baggageclaim clients send fields this agent does not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Strategy {
    /// An empty directory.
    Empty,
    /// A copy-on-write child of an `initialized` parent.
    Cow { volume: Handle },
    /// A directory or a `.tgz`/`.tar.gz` file copied into the new volume.
    Import {
        path: String,
        #[serde(default)]
        follow_symlinks: bool,
    },
}

impl Strategy {
    /// The parent this strategy pins, if any.
    pub fn parent(&self) -> Option<&Handle> {
        match self {
            Strategy::Cow { volume } => Some(volume),
            _ => None,
        }
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Properties, D::Error> {
    Ok(Option::<Properties>::deserialize(d)?.unwrap_or_default())
}

/// `POST /volumes` and `POST /volumes-async`. Unknown fields are ignored, as Go's decoder
/// does: newer baggageclaim clients send fields (e.g. `Uid`, `Gid`) this agent does not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateVolumeRequest {
    pub handle: Handle,
    pub strategy: Strategy,
    /// `null` is accepted and means none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub properties: Properties,
    /// Omitted when false by baggageclaim's client.
    #[serde(default)]
    pub privileged: bool,
    /// Accepted for baggageclaim compatibility; volume-agent volumes never expire by TTL.
    #[serde(default, skip_serializing)]
    pub ttl: Option<u64>,
}

/// A volume as the local API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeJson {
    pub handle: Handle,
    /// Absolute path of the volume's data directory (the one the caller mounts).
    pub path: String,
    pub state: VolumeState,
    pub parent: Option<Handle>,
    pub properties: Properties,
    pub privileged: bool,
    /// `true` when the agent's drift scan found the data directory gone (the volume is
    /// reported `missing` to the central side); omitted otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
}

/// `PUT /volumes/{handle}/properties/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPropertyRequest {
    pub value: String,
}

/// `PUT /volumes/{handle}/privileged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrivilegedRequest {
    pub value: bool,
}

/// `PUT /volumes/{handle}/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStateRequest {
    pub state: VolumeState,
}

/// `POST /volumes-async` answer: the future's handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeFuture {
    pub handle: Handle,
}

/// Every error answer: `{"error": "..."}`, never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// What `gc plan` shows for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlannedAction {
    pub handle: Handle,
    /// `destroy`, `keep`, `blocked`, `wait`, `missing`, `report-destroyed`.
    pub action: String,
    /// Why, in words.
    pub reason: String,
}

/// `GET /gc/plan`: what the next pass would do, destroying nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct PlanView {
    pub revision: Option<u64>,
    pub refused: Option<String>,
    pub actions: Vec<PlannedAction>,
    /// Directories found on disk without a record (after a crash, a lost database or by
    /// hand), moved aside and kept: the agent never deletes them by itself.
    #[serde(default)]
    pub quarantined: Vec<String>,
}
