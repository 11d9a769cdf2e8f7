//! Watches the resource types folder (a rescan every `rescan_interval`, so a change is
//! seen within seconds without depending on inotify) and reports the set at start-up and
//! whenever it changes; a failed report is retried on the next tick.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use protocol::native::{BaseResourceType, ResourceTypesReport};
use tracing::{info, warn};

use crate::central::CentralClient;
use crate::config::Dialect;
use crate::metrics::Metrics;

pub struct ResourceTypesActor {
    dir: PathBuf,
    interval: Duration,
    client: CentralClient,
    dialect: Dialect,
    metrics: Arc<Metrics>,
    /// The types last seen on disk (by folder), and whether the central side has them.
    found: super::Found,
    seen: Option<Vec<BaseResourceType>>,
    reported: bool,
    busy: bool,
}

impl ResourceTypesActor {
    pub fn new(
        dir: PathBuf,
        interval: Duration,
        client: CentralClient,
        dialect: Dialect,
        metrics: Arc<Metrics>,
    ) -> Self {
        ResourceTypesActor {
            dir,
            interval,
            client,
            dialect,
            metrics,
            found: super::Found::new(),
            seen: None,
            reported: false,
            busy: false,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let dir = self.dir.clone();
        let fut = async move { tokio::task::spawn_blocking(move || super::scan(&dir)).await };
        ctx.spawn(fut.into_actor(self).then(|res, act, _| {
            let scan = match res {
                Ok(scan) => scan,
                Err(e) => {
                    // A scan that did not finish says nothing: keep what was reported.
                    warn!(error = %e, "scanning the resource types folder failed; keeping the last set");
                    super::Scan {
                        unlisted: true,
                        ..super::Scan::default()
                    }
                }
            };
            for s in &scan.skipped {
                let kept = act.found.contains_key(&s.folder);
                warn!(
                    folder = %s.folder.display(),
                    kept_last_good = kept,
                    "skipping resource type: {}", s.why
                );
            }
            act.found = super::carry_forward(&act.found, &scan);
            let types = super::listed(&act.found);
            if act.seen.as_ref() != Some(&types) {
                let list: Vec<String> = types
                    .iter()
                    .map(|t| format!("{}@{}", t.name, t.version))
                    .collect();
                info!(types = %list.join(", "), "base resource types");
                act.metrics.set_resource_types(
                    types
                        .iter()
                        .map(|t| (t.name.clone(), t.version.clone()))
                        .collect(),
                );
                act.seen = Some(types);
                act.reported = false;
            }
            let send = (act.dialect == Dialect::Native && !act.reported)
                .then(|| act.seen.clone())
                .flatten();
            let client = act.client.clone();
            let metrics = act.metrics.clone();
            async move {
                let resource_types = send?;
                let res = client
                    .put_resource_types(&ResourceTypesReport { resource_types })
                    .await;
                match &res {
                    Ok(()) => metrics.central_request("base_resource_types", "ok"),
                    Err(e) => {
                        metrics.central_request("base_resource_types", e.kind());
                        warn!(error = %e, "reporting base resource types failed; retrying");
                    }
                }
                Some(res.is_ok())
            }
            .into_actor(act)
            .map(|sent, act, _| {
                act.busy = false;
                if sent == Some(true) {
                    act.reported = true;
                }
            })
        }));
    }
}

impl Actor for ResourceTypesActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tick(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.tick(ctx));
    }
}
