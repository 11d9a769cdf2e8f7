//! Runs the destroys of one plan: at most `max_in_flight` at once, each only after the
//! children it waits for are gone, each bounded by a timeout that never blocks the loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Recipient;
use futures::stream::{FuturesUnordered, StreamExt};
use protocol::Handle;

use crate::inventory::actor::{DestroyDone, DestroyVolume, StoreFailure};
use crate::planner::{Destroy, Reason};

/// Volumes whose destroy is still running on a worker thread (possibly past its timeout).
pub type Busy = Arc<Mutex<HashSet<Handle>>>;

/// How one destroy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done(DestroyDone),
    Failed(String),
    TimedOut(Duration),
}

/// One destroy's result.
#[derive(Debug, Clone)]
pub struct Result {
    pub handle: Handle,
    pub reason: Reason,
    pub outcome: Outcome,
    pub took: Duration,
}

/// Runs `destroys` (children before parents, as the plan orders them). A destroy in
/// `skip` (backing off, or still busy from an earlier pass) is not run, and neither is
/// any ancestor waiting on it.
pub async fn run(
    destroys: &[Destroy],
    skip: &HashSet<Handle>,
    destroyer: &Recipient<DestroyVolume>,
    busy: &Busy,
    max_in_flight: usize,
    timeout: Duration,
) -> Vec<Result> {
    let by_handle: HashMap<&Handle, &Destroy> = destroys.iter().map(|d| (&d.handle, d)).collect();
    let mut parent_of: HashMap<&Handle, &Handle> = HashMap::new();
    let mut waiting_on: HashMap<&Handle, usize> = HashMap::new();
    for d in destroys {
        waiting_on.insert(&d.handle, d.after.len());
        for child in &d.after {
            parent_of.insert(child, &d.handle);
        }
    }
    let mut ready: VecDeque<&Destroy> = destroys
        .iter()
        .filter(|d| d.after.is_empty() && !skip.contains(&d.handle))
        .collect();

    let mut results = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < max_in_flight.max(1) {
            let Some(d) = ready.pop_front() else { break };
            in_flight.push(destroy_one(d, destroyer, busy, timeout));
        }
        let Some(res) = in_flight.next().await else {
            break;
        };
        if matches!(res.outcome, Outcome::Done(_)) {
            if let Some(parent) = parent_of.get(&res.handle) {
                if let Some(n) = waiting_on.get_mut(parent) {
                    *n -= 1;
                    if *n == 0 && !skip.contains(*parent) {
                        if let Some(d) = by_handle.get(parent) {
                            ready.push_back(d);
                        }
                    }
                }
            }
        }
        results.push(res);
    }
    results
}

async fn destroy_one(
    d: &Destroy,
    destroyer: &Recipient<DestroyVolume>,
    busy: &Busy,
    timeout: Duration,
) -> Result {
    let started = Instant::now();
    let handle = d.handle.clone();
    lock(busy).insert(handle.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = DestroyVolume {
        handle: handle.clone(),
        reason: d.reason,
    };
    let destroyer = destroyer.clone();
    let busy_after = busy.clone();
    // The destroy runs to its end even when we stop waiting for it: the volume stays
    // `busy` until then, so no second destroy of it starts meanwhile.
    actix::spawn(async move {
        let res = destroyer.send(msg).await;
        lock(&busy_after).remove(&handle);
        let _ = tx.send(res);
    });
    let outcome = match tokio::time::timeout(timeout, rx).await {
        Err(_) => Outcome::TimedOut(timeout),
        Ok(Err(_)) | Ok(Ok(Err(_))) => Outcome::Failed("the inventory stopped".into()),
        Ok(Ok(Ok(Err(StoreFailure(e))))) => Outcome::Failed(e),
        Ok(Ok(Ok(Ok(done)))) => Outcome::Done(done),
    };
    Result {
        handle: d.handle.clone(),
        reason: d.reason,
        outcome,
        took: started.elapsed(),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
