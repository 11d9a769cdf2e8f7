//! The reconcile plan: a pure function of the inventory snapshot, the desired set, one clock
//! reading and the policy. No I/O and no clock in here, so every rule is unit- and
//! property-tested.
//!
//! Rules (see `central-api.md`, "Ordering rule, both dialects"):
//! * A volume the central side names in `destroying` is a candidate; so is a volume already
//!   in local state `destroying` (an interrupted destroy that must be finished).
//! * In the native dialect, a volume in neither list is *unknown*: a candidate once it is
//!   older than the grace period both as of the answer and by the worker's clock, and never
//!   while it is `creating` or `initializing`.
//! * A candidate is destroyed only when every descendant is destroyed in the same plan.
//!   Otherwise it is blocked by the children that stay. A chain of any depth goes in one
//!   plan: each destroy lists the children it must wait for.
//! * A volume whose data directory is gone (`missing`, found by the inventory's drift scan
//!   and passed in) follows the same rules: kept while desired, destroyed (only its record
//!   and leftovers go) once named or unknown past the grace period, never before its
//!   children. Every missing record is listed in [`Plan::missing`] with the desired
//!   volumes this worker does not have.
//! * The mass-destroy guard drops every destroy *by absence* when the answer leaves more
//!   than `max_destroy_fraction` of the volumes (and more than `guard_min_volumes`) unknown,
//!   whatever their age: an empty or truncated answer is the usual cause.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use protocol::{Handle, VolumeState};

/// What the planner needs to know about one local volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub handle: Handle,
    pub parent: Option<Handle>,
    pub state: VolumeState,
    pub created_at: DateTime<Utc>,
    /// The drift scan found its data directory gone: reported `missing`, not as a volume.
    pub missing: bool,
}

/// What the central side said, in either dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// The native desired set: keep `keep`, destroy `destroying`, the rest is unknown.
    Native {
        keep: Vec<Handle>,
        destroying: Vec<Handle>,
        as_of: DateTime<Utc>,
    },
    /// The ATC's destroying list: destroy exactly these, nothing else.
    Concourse { destroying: Vec<Handle> },
}

/// The knobs of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub unknown_grace: Duration,
    pub max_destroy_fraction: f64,
    /// The guard only applies above this many destroys by absence.
    pub guard_min_volumes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            unknown_grace: Duration::from_secs(300),
            max_destroy_fraction: 0.5,
            guard_min_volumes: 10,
        }
    }
}

/// Why a volume is to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The central side names it in `destroying`.
    Named,
    /// Neither desired nor named, and older than the grace period.
    Unknown,
    /// Already `destroying` locally: an interrupted destroy to finish.
    Resume,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Named => "named destroying by the central side",
            Reason::Unknown => "unknown to the central side and past the grace period",
            Reason::Resume => "an interrupted destroy being finished",
        }
    }
}

/// One destroy of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destroy {
    pub handle: Handle,
    pub reason: Reason,
    /// Children (all destroyed in this plan) that must be gone before this volume goes.
    pub after: Vec<Handle>,
    /// 0 for a volume without children; one more than its highest child otherwise.
    pub height: u32,
}

/// A candidate that stays because some children stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub handle: Handle,
    pub reason: Reason,
    pub by_children: Vec<Handle>,
}

/// Why an unknown volume is kept for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Younger than the grace period; `remaining` until it may go (by the stricter clock).
    Young { remaining: Duration },
    /// Local state `creating` or `initializing`: never destroyed by absence.
    InProgress(VolumeState),
    /// The mass-destroy guard refused this pass.
    Guard,
}

/// The mass-destroy guard's refusal.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub would_destroy: usize,
    pub total: usize,
    pub max_fraction: f64,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused to destroy {} of {} volumes by absence (limit {:.0}%): the desired set looks empty or truncated; volumes named in `destroying` still go",
            self.would_destroy,
            self.total,
            self.max_fraction * 100.0
        )
    }
}

/// The plan: what to destroy in what order, and everything the report and `gc plan` show.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Children before parents: sorted by `height`, then handle.
    pub destroy: Vec<Destroy>,
    pub blocked: Vec<Blocked>,
    /// Named `destroying` but not on this worker: already gone, report as destroyed.
    pub already_gone: Vec<Handle>,
    /// Unknown volumes kept for now, and why.
    pub waiting: Vec<(Handle, WaitReason)>,
    /// What to report `missing`: desired volumes this worker does not have, and every
    /// local record whose data directory is gone. Sorted, without repeats.
    pub missing: Vec<Handle>,
    pub refused: Option<Refusal>,
}

/// Computes the plan. Pure: same inputs, same plan.
pub fn plan(local: &[LocalVolume], desired: &Desired, now: DateTime<Utc>, policy: &Policy) -> Plan {
    let n = local.len();
    // Handle → position. foldhash (seeded per process) instead of SipHash: the index is
    // built and probed a few hundred thousand times per pass at 100,000 volumes, and
    // hashing was a fifth of the planner's time.
    let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(n, foldhash::fast::RandomState::default());
    for (i, v) in local.iter().enumerate() {
        index.insert(v.handle.as_str(), i);
    }

    let mut out = Plan::default();
    let mut candidate: Vec<Option<Reason>> = vec![None; n];

    let (named, keep, as_of): (&[Handle], Option<&[Handle]>, Option<DateTime<Utc>>) = match desired
    {
        Desired::Native {
            keep,
            destroying,
            as_of,
        } => (destroying, Some(keep), Some(*as_of)),
        Desired::Concourse { destroying } => (destroying, None, None),
    };
    // Which local volumes are desired (one index lookup per desired handle), and which
    // desired handles this worker does not have.
    let kept: Option<Vec<bool>> = keep.map(|keep| {
        let mut kept = vec![false; n];
        for h in keep {
            match index.get(h.as_str()) {
                Some(&i) => kept[i] = true,
                None => out.missing.push(h.clone()),
            }
        }
        kept
    });
    out.missing
        .extend(local.iter().filter(|v| v.missing).map(|v| v.handle.clone()));
    out.missing.sort();
    out.missing.dedup();

    for h in named {
        match index.get(h.as_str()) {
            Some(&i) => candidate[i] = Some(Reason::Named),
            None => out.already_gone.push(h.clone()),
        }
    }
    out.already_gone.sort();
    out.already_gone.dedup();

    // Unknown volumes: in neither list and not already being destroyed. The guard counts
    // all of them, whatever their age, so a truncated answer cannot leak destroys out a
    // few at a time as volumes age past the grace period.
    let mut unknown = Vec::new();
    for (i, v) in local.iter().enumerate() {
        if v.state == VolumeState::Destroying && candidate[i].is_none() {
            candidate[i] = Some(Reason::Resume);
            continue;
        }
        let Some(kept) = &kept else { continue };
        if candidate[i].is_some() || kept[i] {
            continue;
        }
        unknown.push(i);
    }

    let guard_trips = unknown.len() > policy.guard_min_volumes
        && (unknown.len() as f64) > policy.max_destroy_fraction * n as f64;
    if guard_trips {
        out.refused = Some(Refusal {
            would_destroy: unknown.len(),
            total: n,
            max_fraction: policy.max_destroy_fraction,
        });
    }
    if let Some(as_of) = as_of {
        for i in unknown {
            let v = &local[i];
            if matches!(v.state, VolumeState::Creating | VolumeState::Initializing) {
                out.waiting
                    .push((v.handle.clone(), WaitReason::InProgress(v.state)));
                continue;
            }
            if guard_trips {
                out.waiting.push((v.handle.clone(), WaitReason::Guard));
                continue;
            }
            let age = age(now, v.created_at).min(age(as_of, v.created_at));
            if age >= policy.unknown_grace {
                candidate[i] = Some(Reason::Unknown);
            } else {
                out.waiting.push((
                    v.handle.clone(),
                    WaitReason::Young {
                        remaining: policy.unknown_grace - age,
                    },
                ));
            }
        }
    }

    // Children by parent (volumes whose parent is on this worker), as one flat array:
    // the children of `p` are `child_list[start[p]..start[p + 1]]`.
    let mut parent_of: Vec<Option<usize>> = vec![None; n];
    let mut start = vec![0usize; n + 1];
    for (i, v) in local.iter().enumerate() {
        if let Some(&p) = v.parent.as_ref().and_then(|p| index.get(p.as_str())) {
            if p != i {
                parent_of[i] = Some(p);
                start[p + 1] += 1;
            }
        }
    }
    for p in 0..n {
        start[p + 1] += start[p];
    }
    let mut fill = start.clone();
    let mut child_list = vec![0usize; start[n]];
    for (i, p) in parent_of.iter().enumerate() {
        if let Some(p) = *p {
            child_list[fill[p]] = i;
            fill[p] += 1;
        }
    }
    let children = |p: usize| &child_list[start[p]..start[p + 1]];

    // Leaves first (Kahn): a volume is resolved once all its children are. Volumes on a
    // parent cycle (impossible in a sound inventory) are never resolved and so never go.
    let mut pending: Vec<usize> = (0..n).map(|p| children(p).len()).collect();
    let mut destroyable = vec![false; n];
    let mut resolved = vec![false; n];
    let mut height = vec![0u32; n];
    let mut queue: VecDeque<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    while let Some(i) = queue.pop_front() {
        resolved[i] = true;
        let all_children_go = children(i).iter().all(|&c| destroyable[c]);
        destroyable[i] = candidate[i].is_some() && all_children_go;
        height[i] = children(i)
            .iter()
            .map(|&c| height[c] + 1)
            .max()
            .unwrap_or(0);
        if let Some(p) = parent_of[i] {
            pending[p] -= 1;
            if pending[p] == 0 {
                queue.push_back(p);
            }
        }
    }

    for i in 0..n {
        let Some(reason) = candidate[i] else { continue };
        let handles = |keep: &dyn Fn(usize) -> bool| {
            let mut kids: Vec<Handle> = children(i)
                .iter()
                .filter(|&&c| keep(c))
                .map(|&c| local[c].handle.clone())
                .collect();
            kids.sort();
            kids
        };
        if destroyable[i] {
            out.destroy.push(Destroy {
                handle: local[i].handle.clone(),
                reason,
                after: handles(&|_| true),
                height: height[i],
            });
        } else {
            // Resolved: name only the children that stay. On a cycle: all of them.
            let by_children = handles(&|c| !resolved[i] || !destroyable[c]);
            out.blocked.push(Blocked {
                handle: local[i].handle.clone(),
                reason,
                by_children,
            });
        }
    }

    out.destroy
        .sort_by(|a, b| (a.height, &a.handle).cmp(&(b.height, &b.handle)));
    out.blocked.sort_by(|a, b| a.handle.cmp(&b.handle));
    out.waiting.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn age(at: DateTime<Utc>, created: DateTime<Utc>) -> Duration {
    (at - created).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests;
