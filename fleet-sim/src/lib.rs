//! fleet-sim: thousands of simulated volume-agent workers in one process against
//! volume-central replicas on one PostgreSQL.
//!
//! Each simulated worker is built on the agent's own pieces: its central client
//! ([`volume_agent::central::CentralClient`]), its poll timing with jitter and backoff
//! ([`volume_agent::central::actor::poll_delay`]), its staleness check, and its planner
//! ([`volume_agent::planner::plan`]) over an in-memory volume set. A scheduler driver
//! creates and releases builds through the scheduler API. Invariants are checked at
//! every destroy (no volume still in use destroyed, never a parent before its child) and
//! at the end (every released volume gone from its worker and from the database).
//!
//! * [`run`]: one scenario, start to end; [`Outcome`] has the figures and violations.
//! * `worker`, `scheduler`: the two kinds of client; `fleet`: PostgreSQL and the
//!   replicas; `stats`: what is recorded; `plot`: the picture; `cpu`: /proc readings.

pub mod cpu;
pub mod fleet;
pub mod plot;
pub mod real;
pub mod scenario;
pub mod scheduler;
pub mod stats;
pub mod worker;

pub use scenario::{run, Options, Outcome, Scenario};
