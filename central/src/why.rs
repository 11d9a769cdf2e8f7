//! "Why is this volume kept, or why is it going?" — `GET /api/v1/volumes/{h}/why`.
//!
//! [`facts`] reads what the database knows about one volume (its owners, live children,
//! the uses of its resource cache, when it lost its last owner, when and why the GC marked
//! it); [`verdict`] (pure) turns that into the answer an operator reads: every owner that
//! keeps the volume, or why it is garbage and since when.

use chrono::{DateTime, Utc};
use protocol::{Handle, VolumeState};
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::error::{Error, Result};

/// Most builds named per resource cache (the count is always complete).
pub const BUILDS_SHOWN: i64 = 20;

/// One thing that keeps a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// A container uses the volume (`POST /api/v1/workers/{w}/containers`).
    Container { handle: String },
    /// The volume holds a resource cache; the cache stays while a build uses it or a
    /// custom resource type's config is built on it.
    ResourceCache {
        id: i64,
        version: String,
        /// Builds using the cache (all of them counted, the first [`BUILDS_SHOWN`] named).
        uses: i64,
        builds: Vec<i64>,
        /// Resource configs of custom resource types built on this cache.
        configs: i64,
        /// Since when no build uses it: retained while its worker has room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retained_since: Option<DateTime<Utc>>,
        /// The scheduler's mark: `auto`, `keep` or `drop`.
        #[serde(default)]
        retention: String,
    },
    /// The volume is the worker's copy of a base resource type it still reports.
    BaseResourceType { name: String, version: String },
    /// A child volume (copy-on-write) that is not being destroyed: the parent stays
    /// until it goes, whatever else happens.
    Child { handle: Handle, state: VolumeState },
}

/// Everything [`verdict`] needs about one volume, as [`facts`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub handle: Handle,
    pub worker: String,
    pub state: VolumeState,
    pub parent: Option<Handle>,
    pub created_at: DateTime<Utc>,
    pub missing_since: Option<DateTime<Utc>>,
    pub unowned_since: Option<DateTime<Utc>>,
    pub destroying_since: Option<DateTime<Utc>>,
    pub destroy_reason: Option<String>,
    /// Direct owners and children (children in any state; `verdict` sorts them out).
    pub owners: Vec<Owner>,
    pub destroying_children: Vec<Handle>,
    /// Set when the GC took the volume from its resource cache.
    pub eviction: Option<EvictionFacts>,
}

/// Which cache the GC took from the volume, why, when, and the bytes it held on the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvictionFacts {
    pub resource_cache: i64,
    /// `pressure`, `budget` or `dropped`.
    pub reason: String,
    pub at: DateTime<Utc>,
    /// Bytes of the cache on the worker at the eviction (last reported).
    pub bytes: Option<i64>,
}

fn eviction_text(e: &EvictionFacts, worker: &str) -> String {
    let why = match e.reason.as_str() {
        "pressure" => format!("evicted under disk pressure on worker {worker}"),
        "budget" => format!(
            "evicted because worker {worker} held more retained cache bytes than its cache_budget"
        ),
        "dropped" => "dropped (the scheduler marked it `drop` and no build used it)".to_string(),
        other => format!("evicted ({other})"),
    };
    let bytes = e
        .bytes
        .map(|b| format!(", freeing about {b} bytes on this worker"))
        .unwrap_or_default();
    format!(
        "its resource cache {} was {why} at {}{bytes}",
        e.resource_cache, e.at
    )
}

/// What the volume's fate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// At least one owner keeps it.
    Kept,
    /// Nothing keeps it: the next GC pass marks it `destroying`.
    Garbage,
    /// The GC marked it; the worker destroys it (after its children).
    Destroying,
}

/// The answer of `GET /api/v1/volumes/{h}/why`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Why {
    pub handle: Handle,
    pub worker: String,
    pub state: VolumeState,
    pub parent: Option<Handle>,
    pub status: Status,
    /// Since when the status holds, where known: when the last owner went (garbage) or
    /// when the GC marked it (destroying).
    pub since: Option<DateTime<Utc>>,
    /// Every owner that keeps it (empty unless `kept`, but a volume being destroyed
    /// lists the children it waits for).
    pub owners: Vec<Owner>,
    pub missing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The answer in one or two sentences.
    pub explanation: String,
    /// Set when the GC evicted the volume's resource cache from its worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction: Option<EvictionFacts>,
}

fn owner_text(o: &Owner) -> String {
    match o {
        Owner::Container { handle } => format!("container {handle}"),
        Owner::ResourceCache {
            id,
            version,
            uses,
            configs,
            retained_since,
            retention,
            ..
        } => {
            let mut s = format!("resource cache {id} (version {version}): ");
            match (uses, configs) {
                (0, 0) => {
                    let since = retained_since
                        .map(|t| format!(" since {t}"))
                        .unwrap_or_default();
                    s.push_str(&match retention.as_str() {
                        "drop" => format!("no build uses it{since} and the scheduler marked it `drop`; the next GC pass deletes the cache"),
                        "keep" => format!("retained{since}, marked `keep` by the scheduler: no build uses it, it is evicted only under disk pressure"),
                        _ => format!("retained{since}: no build uses it, it is kept while its worker has room and evicted least recently used first under disk pressure or over the worker's cache_budget"),
                    })
                }
                (u, 0) => s.push_str(&format!("used by {u} build(s)")),
                (0, c) => s.push_str(&format!(
                    "{c} custom resource type config(s) are built on it"
                )),
                (u, c) => s.push_str(&format!(
                    "used by {u} build(s), {c} custom resource type config(s) built on it"
                )),
            }
            s
        }
        Owner::BaseResourceType { name, version } => {
            format!("base resource type {name} {version} (the worker still reports it)")
        }
        Owner::Child { handle, state } => format!("child volume {handle} ({state})"),
    }
}

/// The operator's answer for `f`. Pure: no clock, no I/O.
pub fn verdict(f: Facts) -> Why {
    let live: Vec<Owner> = f
        .owners
        .into_iter()
        .filter(|o| {
            !matches!(
                o,
                Owner::Child {
                    state: VolumeState::Destroying,
                    ..
                }
            )
        })
        .collect();
    let missing = f
        .missing_since
        .map(|t| format!(" The worker last reported it missing (directory gone) since {t}."))
        .unwrap_or_default();
    let evicted = f.eviction.as_ref().map(|e| eviction_text(e, &f.worker));
    let (status, since, owners, explanation) = if f.state == VolumeState::Destroying {
        let why = match f.destroy_reason.as_deref() {
            Some("unowned") => match &evicted {
                Some(e) => format!("nothing owned it any more: {e}"),
                None => "nothing owned it any more".to_string(),
            },
            Some("missing") => {
                "its worker reported it missing for longer than the GC's missing grace".to_string()
            }
            _ => "it was marked for destruction".to_string(),
        };
        let mut text = format!("Garbage, being destroyed by worker {}: {why}.", f.worker);
        let children: Vec<&Owner> = live
            .iter()
            .filter(|o| matches!(o, Owner::Child { .. }))
            .collect();
        if !children.is_empty() || !f.destroying_children.is_empty() {
            let mut waits: Vec<String> = children.iter().map(|o| owner_text(o)).collect();
            waits.extend(
                f.destroying_children
                    .iter()
                    .map(|h| format!("child volume {h} (destroying)")),
            );
            text.push_str(&format!(
                " The worker destroys it after its children: {}.",
                waits.join(", ")
            ));
        }
        (Status::Destroying, f.destroying_since, live, text)
    } else if live.is_empty() {
        let since = f
            .unowned_since
            .map(|t| format!(" since {t}"))
            .unwrap_or_default();
        let evicted = evicted.map(|e| format!(" ({e})")).unwrap_or_default();
        (
            Status::Garbage,
            f.unowned_since,
            live,
            format!(
                "Garbage: no container, resource cache, base resource type or live child keeps it{since}{evicted}; the next GC pass marks it destroying and worker {} then destroys it.",
                f.worker
            ),
        )
    } else {
        let list: Vec<String> = live.iter().map(owner_text).collect();
        (
            Status::Kept,
            None,
            live,
            format!("Kept by {}.", list.join("; ")),
        )
    };
    Why {
        handle: f.handle,
        worker: f.worker,
        state: f.state,
        parent: f.parent,
        status,
        since,
        owners,
        missing_since: f.missing_since,
        created_at: f.created_at,
        explanation: format!("{explanation}{missing}"),
        eviction: f.eviction,
    }
}

fn handle_of(s: String) -> Result<Handle> {
    Handle::new(s).map_err(|e| Error::Database(format!("stored handle is invalid: {e}")))
}

/// Reads the facts about `handle` (404 when no such volume). One snapshot: a repeatable
/// read transaction.
pub async fn facts(db: &Db, handle: &Handle) -> Result<Facts> {
    let mut client = db.client().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let row = tx
        .query_opt(
            "SELECT v.id, v.worker_name, v.state, p.handle, v.created_at, v.missing_since,
                    v.unowned_since, v.destroying_since, v.destroy_reason,
                    c.handle, v.resource_cache_id, rc.version, b.name, b.version,
                    rc.retained_since, rc.retention, v.evicted_cache_id, v.evict_reason,
                    v.evicted_at, v.evicted_cache_bytes
               FROM volumes v
               LEFT JOIN volumes p ON p.id = v.parent_id
               LEFT JOIN containers c ON c.id = v.container_id
               LEFT JOIN resource_caches rc ON rc.id = v.resource_cache_id
               LEFT JOIN worker_base_resource_types w ON w.id = v.worker_base_resource_type_id
               LEFT JOIN base_resource_types b ON b.id = w.base_resource_type_id
              WHERE v.handle = $1",
            &[&handle.as_str()],
        )
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no volume {handle} is known to volume-central (never created, or already destroyed and reported)"
            ))
        })?;
    let id: i64 = row.get(0);
    let state: String = row.get(2);
    let state: VolumeState = state.parse().map_err(Error::Database)?;
    let mut owners = Vec::new();
    if let Some(c) = row.get::<_, Option<String>>(9) {
        owners.push(Owner::Container { handle: c });
    }
    if let Some(cache) = row.get::<_, Option<i64>>(10) {
        let uses: i64 = tx
            .query_one(
                "SELECT count(*) FROM resource_cache_uses WHERE resource_cache_id = $1",
                &[&cache],
            )
            .await?
            .get(0);
        let builds = tx
            .query(
                "SELECT build_id FROM resource_cache_uses WHERE resource_cache_id = $1
                  ORDER BY build_id LIMIT $2",
                &[&cache, &BUILDS_SHOWN],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let configs: i64 = tx
            .query_one(
                "SELECT count(*) FROM resource_configs WHERE resource_cache_id = $1",
                &[&cache],
            )
            .await?
            .get(0);
        owners.push(Owner::ResourceCache {
            id: cache,
            version: row.get::<_, Option<String>>(11).unwrap_or_default(),
            uses,
            builds,
            configs,
            retained_since: row.get(14),
            retention: row.get::<_, Option<String>>(15).unwrap_or_default(),
        });
    }
    if let (Some(name), Some(version)) = (
        row.get::<_, Option<String>>(12),
        row.get::<_, Option<String>>(13),
    ) {
        owners.push(Owner::BaseResourceType { name, version });
    }
    let mut destroying_children = Vec::new();
    for child in tx
        .query(
            "SELECT handle, state FROM volumes WHERE parent_id = $1 ORDER BY handle",
            &[&id],
        )
        .await?
    {
        let h = handle_of(child.get(0))?;
        let s: String = child.get(1);
        let s: VolumeState = s.parse().map_err(Error::Database)?;
        if s == VolumeState::Destroying {
            destroying_children.push(h);
        } else {
            owners.push(Owner::Child {
                handle: h,
                state: s,
            });
        }
    }
    tx.commit().await?;
    Ok(Facts {
        handle: handle.clone(),
        worker: row.get(1),
        state,
        parent: row.get::<_, Option<String>>(3).map(handle_of).transpose()?,
        created_at: row.get(4),
        missing_since: row.get(5),
        unowned_since: row.get(6),
        destroying_since: row.get(7),
        destroy_reason: row.get(8),
        owners,
        destroying_children,
        eviction: match (
            row.get::<_, Option<i64>>(16),
            row.get::<_, Option<String>>(17),
            row.get::<_, Option<DateTime<Utc>>>(18),
        ) {
            (Some(resource_cache), Some(reason), Some(at)) => Some(EvictionFacts {
                resource_cache,
                reason,
                at,
                bytes: row.get(19),
            }),
            _ => None,
        },
    })
}

/// [`facts`] then [`verdict`].
pub async fn why(db: &Db, handle: &Handle) -> Result<Why> {
    Ok(verdict(facts(db, handle).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Handle {
        Handle::new(s).expect("handle")
    }

    fn facts(state: VolumeState, owners: Vec<Owner>) -> Facts {
        Facts {
            handle: h("v"),
            worker: "w1".into(),
            state,
            parent: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            missing_since: None,
            unowned_since: None,
            destroying_since: None,
            destroy_reason: None,
            owners,
            destroying_children: Vec::new(),
            eviction: None,
        }
    }

    #[test]
    fn names_every_owner_that_keeps_a_volume() {
        let why = verdict(facts(
            VolumeState::Initialized,
            vec![
                Owner::Container {
                    handle: "c1".into(),
                },
                Owner::ResourceCache {
                    id: 7,
                    version: "v1".into(),
                    uses: 2,
                    builds: vec![10, 11],
                    configs: 0,
                    retained_since: None,
                    retention: "auto".into(),
                },
                Owner::BaseResourceType {
                    name: "git".into(),
                    version: "1.0".into(),
                },
                Owner::Child {
                    handle: h("kid"),
                    state: VolumeState::Created,
                },
            ],
        ));
        assert_eq!(why.status, Status::Kept);
        assert_eq!(why.owners.len(), 4);
        for part in [
            "container c1",
            "resource cache 7",
            "used by 2 build",
            "git 1.0",
            "child volume kid",
        ] {
            assert!(
                why.explanation.contains(part),
                "{part}: {}",
                why.explanation
            );
        }
    }

    #[test]
    fn an_unowned_volume_is_garbage_since_it_lost_its_last_owner() {
        let mut f = facts(VolumeState::Initialized, Vec::new());
        let t = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(60);
        f.unowned_since = Some(t);
        let why = verdict(f);
        assert_eq!(why.status, Status::Garbage);
        assert_eq!(why.since, Some(t));
        assert!(
            why.explanation.contains("next GC pass"),
            "{}",
            why.explanation
        );
    }

    #[test]
    fn a_child_being_destroyed_does_not_keep_its_parent() {
        let mut f = facts(VolumeState::Initialized, Vec::new());
        f.owners.push(Owner::Child {
            handle: h("kid"),
            state: VolumeState::Destroying,
        });
        assert_eq!(verdict(f).status, Status::Garbage);
    }

    #[test]
    fn a_marked_volume_says_why_and_waits_for_its_children() {
        let mut f = facts(
            VolumeState::Destroying,
            vec![Owner::Child {
                handle: h("kid"),
                state: VolumeState::Initialized,
            }],
        );
        f.destroy_reason = Some("missing".into());
        f.destroying_children.push(h("other"));
        let t = DateTime::<Utc>::UNIX_EPOCH;
        f.destroying_since = Some(t);
        let why = verdict(f);
        assert_eq!(why.status, Status::Destroying);
        assert_eq!(why.since, Some(t));
        assert!(
            why.explanation.contains("missing grace"),
            "{}",
            why.explanation
        );
        assert!(
            why.explanation.contains("kid") && why.explanation.contains("other"),
            "{}",
            why.explanation
        );
    }

    fn unused_cache(retention: &str) -> Owner {
        Owner::ResourceCache {
            id: 3,
            version: "v".into(),
            uses: 0,
            builds: Vec::new(),
            configs: 0,
            retained_since: Some(DateTime::<Utc>::UNIX_EPOCH),
            retention: retention.into(),
        }
    }

    #[test]
    fn an_unused_cache_is_retained_unless_marked_drop() {
        let why = verdict(facts(VolumeState::Initialized, vec![unused_cache("auto")]));
        assert_eq!(why.status, Status::Kept);
        assert!(
            why.explanation.contains("retained since") && why.explanation.contains("has room"),
            "{}",
            why.explanation
        );
        let why = verdict(facts(VolumeState::Initialized, vec![unused_cache("drop")]));
        assert!(
            why.explanation.contains("deletes the cache"),
            "{}",
            why.explanation
        );
    }

    #[test]
    fn an_evicted_volume_says_which_cache_left_why_when_and_what_it_freed() {
        let mut f = facts(VolumeState::Destroying, Vec::new());
        f.destroy_reason = Some("unowned".into());
        f.eviction = Some(EvictionFacts {
            resource_cache: 9,
            reason: "pressure".into(),
            at: DateTime::<Utc>::UNIX_EPOCH,
            bytes: Some(4096),
        });
        let why = verdict(f);
        for part in ["resource cache 9", "disk pressure", "4096 bytes"] {
            assert!(
                why.explanation.contains(part),
                "{part}: {}",
                why.explanation
            );
        }
    }
}
