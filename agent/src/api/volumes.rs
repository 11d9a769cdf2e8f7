//! Volume routes in baggageclaim's wire shape.

use std::collections::{BTreeMap, HashMap};

use actix_web::{web, HttpResponse};
use protocol::local::{
    CreateVolumeRequest, SetPrivilegedRequest, SetPropertyRequest, SetStateRequest, Strategy,
    VolumeJson,
};
use protocol::Handle;

use super::{ApiError, ApiState};
use crate::inventory::{DestroyOutcome, Inventory, InventoryError, VolumeRecord};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/volumes", web::post().to(create))
        .route("/volumes", web::get().to(list))
        // Before `/volumes/{handle}`: a volume named `destroy` must not shadow it.
        .route("/volumes/destroy", web::delete().to(destroy_many))
        .route("/volumes/{handle}", web::get().to(get))
        // The operator's view: every record, whatever its state (`volume-agent volumes`).
        .route("/inventory", web::get().to(list_all))
        .route("/inventory/{handle}", web::get().to(get_any))
        .route("/volumes/{handle}", web::delete().to(destroy))
        .route(
            "/volumes/{handle}/properties/{key}",
            web::put().to(set_property),
        )
        .route("/volumes/{handle}/state", web::put().to(set_state))
        .route(
            "/volumes/{handle}/privileged",
            web::get().to(get_privileged),
        )
        .route(
            "/volumes/{handle}/privileged",
            web::put().to(set_privileged),
        );
}

/// Parses a handle from the path: anything that is not a handle is a 400, never a path.
pub fn handle(raw: &str) -> Result<Handle, ApiError> {
    Handle::new(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

pub fn volume_json(r: &VolumeRecord) -> VolumeJson {
    VolumeJson {
        handle: r.handle.clone(),
        path: r.path.to_string_lossy().into_owned(),
        state: r.state,
        parent: r.parent.clone(),
        properties: r.properties.clone(),
        privileged: r.privileged,
        missing: r.missing,
    }
}

/// Runs `f` on one of the inventory actor's threads.
pub async fn blocking<T, F>(state: &ApiState, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&Inventory) -> Result<T, InventoryError> + Send + 'static,
    T: Send + 'static,
{
    Ok(state.inventory.call(f).await??)
}

async fn create(
    state: web::Data<ApiState>,
    body: web::Json<CreateVolumeRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    if let Strategy::Import { .. } = &req.strategy {
        return Err(ApiError::Unprocessable(
            "the import strategy is served by POST /volumes-async".into(),
        ));
    }
    let record = blocking(&state, move |inv| {
        inv.create_volume(req, protocol::VolumeState::Created)
    })
    .await?;
    Ok(HttpResponse::Created().json(volume_json(&record)))
}

/// Whether baggageclaim's lookups (`GET /volumes`, `GET /volumes/{h}`, `GET
/// /volumes/{h}/privileged`) show a record. Baggageclaim keeps a volume being created in
/// `init/` and one being destroyed in `dead/`, and looks only in `live/`, so both are
/// invisible (listed by nobody, 404 to a lookup); a volume whose directory vanished fails
/// its lookup too. The agent answers the same; `GET /inventory` shows every record.
pub fn visible(r: &VolumeRecord) -> bool {
    use protocol::VolumeState::*;
    !r.missing && matches!(r.state, Created | Initializing | Initialized)
}

fn with_properties<'a>(
    records: impl IntoIterator<Item = &'a VolumeRecord>,
    wanted: &BTreeMap<String, String>,
) -> Vec<VolumeJson> {
    records
        .into_iter()
        .filter(|r| wanted.iter().all(|(k, v)| r.properties.get(k) == Some(v)))
        .map(volume_json)
        .collect()
}

async fn list(
    state: web::Data<ApiState>,
    query: web::Query<BTreeMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let records = blocking(&state, |inv| inv.list()).await?;
    let out = with_properties(records.iter().filter(|r| visible(r)), &query);
    Ok(HttpResponse::Ok().json(out))
}

/// `GET /inventory?k=v`: every record with its state, `missing` flag included.
async fn list_all(
    state: web::Data<ApiState>,
    query: web::Query<BTreeMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let records = blocking(&state, |inv| inv.list()).await?;
    Ok(HttpResponse::Ok().json(with_properties(&records, &query)))
}

/// The record named in the path, whatever its state, or 404.
async fn find_any(state: &ApiState, raw: &str) -> Result<VolumeRecord, ApiError> {
    let h = handle(raw)?;
    let found = {
        let h = h.clone();
        blocking(state, move |inv| inv.get(&h)).await?
    };
    found.ok_or_else(|| InventoryError::NotFound(h).into())
}

/// The volume named in the path as baggageclaim's lookups see it (see [`visible`]), or 404.
async fn find(state: &ApiState, raw: &str) -> Result<VolumeRecord, ApiError> {
    let r = find_any(state, raw).await?;
    if visible(&r) {
        Ok(r)
    } else {
        Err(InventoryError::NotFound(r.handle).into())
    }
}

async fn get(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = find(&state, &path).await?;
    Ok(HttpResponse::Ok().json(volume_json(&r)))
}

async fn get_any(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = find_any(&state, &path).await?;
    Ok(HttpResponse::Ok().json(volume_json(&r)))
}

async fn destroy(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&path)?;
    let outcome = {
        let h = h.clone();
        blocking(&state, move |inv| inv.destroy(&h)).await?
    };
    match outcome {
        DestroyOutcome::Destroyed => {
            tracing::info!(handle = %h, reason = "destroyed through the local API", "destroyed volume");
            Ok(HttpResponse::NoContent().finish())
        }
        DestroyOutcome::AlreadyGone => Err(InventoryError::NotFound(h).into()),
    }
}

/// Orders `handles` so that every volume comes after its descendants within the batch.
pub fn children_first(handles: Vec<Handle>, records: &[VolumeRecord]) -> Vec<Handle> {
    let parent: HashMap<&Handle, &Handle> = records
        .iter()
        .filter_map(|r| r.parent.as_ref().map(|p| (&r.handle, p)))
        .collect();
    let depth = |h: &Handle| {
        let mut d = 0usize;
        let mut cur = h;
        while let Some(p) = parent.get(cur) {
            d += 1;
            cur = p;
            if d > records.len() {
                break;
            }
        }
        d
    };
    let mut with_depth: Vec<(usize, Handle)> =
        handles.into_iter().map(|h| (depth(&h), h)).collect();
    with_depth.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    with_depth.dedup_by(|a, b| a.1 == b.1);
    with_depth.into_iter().map(|(_, h)| h).collect()
}

/// `DELETE /volumes/destroy`: like baggageclaim, tries every handle (children before
/// parents within the batch), skips unknown ones and reports every failure at the end.
async fn destroy_many(
    state: web::Data<ApiState>,
    body: web::Json<Vec<Handle>>,
) -> Result<HttpResponse, ApiError> {
    let handles = body.into_inner();
    let failed = blocking(&state, move |inv| {
        let records = inv.list()?;
        let mut failed = Vec::new();
        for h in children_first(handles, &records) {
            match inv.destroy(&h) {
                Ok(DestroyOutcome::Destroyed) => {
                    tracing::info!(handle = %h, reason = "bulk destroy through the local API", "destroyed volume")
                }
                Ok(DestroyOutcome::AlreadyGone) | Err(InventoryError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(handle = %h, error = %e, "bulk destroy: could not destroy volume; going on with the rest");
                    failed.push((h, ApiError::from(e)));
                }
            }
        }
        Ok(failed)
    })
    .await?;
    if failed.is_empty() {
        return Ok(HttpResponse::NoContent().finish());
    }
    // A conflict the caller can resolve (live children, a volume still being created)
    // stays a 409; anything else is the 500 baggageclaim answers.
    let only_conflicts = failed
        .iter()
        .all(|(_, e)| matches!(e, ApiError::Conflict(_)));
    let msg = format!(
        "failed to destroy {} of the volumes: {}",
        failed.len(),
        failed
            .iter()
            .map(|(h, e)| format!("{h}: {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if only_conflicts {
        Err(ApiError::Conflict(msg))
    } else {
        Err(ApiError::Internal(msg))
    }
}

async fn set_property(
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
    body: web::Json<SetPropertyRequest>,
) -> Result<HttpResponse, ApiError> {
    let (raw, key) = path.into_inner();
    let h = handle(&raw)?;
    if key.is_empty() {
        return Err(ApiError::BadRequest(
            "property name must not be empty".into(),
        ));
    }
    let value = body.into_inner().value;
    blocking(&state, move |inv| inv.set_property(&h, &key, &value)).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn set_state(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    body: web::Json<SetStateRequest>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&path)?;
    let to = body.into_inner().state;
    blocking(&state, move |inv| inv.set_state(&h, to)).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn get_privileged(
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let r = find(&state, &path).await?;
    Ok(HttpResponse::Ok().json(r.privileged))
}

async fn set_privileged(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    body: web::Json<SetPrivilegedRequest>,
) -> Result<HttpResponse, ApiError> {
    let h = handle(&path)?;
    let value = body.into_inner().value;
    blocking(&state, move |inv| inv.set_privileged(&h, value)).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::DriverKind;
    use protocol::VolumeState;

    fn record(state: VolumeState, missing: bool) -> VolumeRecord {
        VolumeRecord {
            handle: Handle::new("v").expect("handle"),
            state,
            parent: None,
            driver: DriverKind::Naive,
            path: "/volumes/live/v/volume".into(),
            properties: BTreeMap::new(),
            privileged: false,
            created_at: chrono::Utc::now(),
            changed_at: chrono::Utc::now(),
            missing,
        }
    }

    #[test]
    fn lookups_hide_volumes_being_created_or_destroyed_like_baggageclaim() {
        use VolumeState::*;
        for (state, shown) in [
            (Creating, false),
            (Created, true),
            (Initializing, true),
            (Initialized, true),
            (Destroying, false),
        ] {
            assert_eq!(visible(&record(state, false)), shown, "{state}");
        }
    }

    #[test]
    fn lookups_hide_a_volume_whose_directory_vanished() {
        assert!(!visible(&record(VolumeState::Initialized, true)));
    }
}
