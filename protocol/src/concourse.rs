//! The endpoints a Concourse ATC serves today (`atc/routes.go`).

use serde::{Deserialize, Deserializer, Serialize};

use crate::Handle;

/// `GET /api/v1/volumes/destroying?worker_name=W`.
pub const DESTROYING_PATH: &str = "/api/v1/volumes/destroying";
/// `PUT /api/v1/volumes/report?worker_name=W`.
pub const REPORT_PATH: &str = "/api/v1/volumes/report";

/// The ATC's destroying list. It answers `null` when there are none: that is `[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct DestroyingList(pub Vec<Handle>);

impl<'de> Deserialize<'de> for DestroyingList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(DestroyingList(
            Option::<Vec<Handle>>::deserialize(d)?.unwrap_or_default(),
        ))
    }
}

/// The report body: every handle the worker still has.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReportedHandles(pub Vec<Handle>);
