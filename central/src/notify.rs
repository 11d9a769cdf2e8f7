//! What `volume-central run` tells systemd (`Type=notify`, see
//! `systemd/volume-central.service`), through the `sd-notify` crate:
//!
//! - `READY=1` once the database has answered and its schema is current (after the
//!   migrations of `run --migrate`) and the HTTP listener is bound;
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC`, from [`watchdog`], a task on the
//!   server's runtime that pets only when a check of the connection pool has finished
//!   (answered either way) within that half: a runtime that no longer ticks, or a pool
//!   that hangs past its own timeouts, stops the petting and systemd restarts the service;
//! - `STOPPING=1` when SIGTERM or SIGINT starts the stop;
//! - `STATUS=...` lines for `systemctl status` while it waits for the database.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every message is dropped. A message that
//! cannot be sent is logged and otherwise ignored: the service works without systemd.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::db::Db;

/// Sends `states` in one message; logs (does not return) a failure.
fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(
            "cannot send {} to systemd's notification socket (NOTIFY_SOCKET): {err}; \
             run the service with Type=notify and NotifyAccess=main, or unset NOTIFY_SOCKET",
            states
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `STATUS=...` (one line: line breaks become spaces).
pub fn status(text: &str) {
    let line = text.replace(['\n', '\r'], " ");
    send(&[NotifyState::Status(&line)]);
}

/// How often to pet the watchdog: half of `WATCHDOG_USEC` when systemd set it for this
/// process, `None` when the watchdog is off.
pub fn watchdog_interval() -> Option<Duration> {
    half_of(sd_notify::watchdog_enabled())
}

/// Half of a watchdog timeout; `None` for none or zero.
fn half_of(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| t / 2)
}

/// Whether one liveness check passed: the pool answered `db.ping()` (with a row or an
/// error: a database that is down is the pool answering, and the service keeps serving
/// 503 until it is back) within `limit`.
pub async fn alive(db: &Db, limit: Duration) -> bool {
    match tokio::time::timeout(limit, db.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            tracing::debug!("watchdog check: the database did not answer ({err})");
            true
        }
        Err(_) => false,
    }
}

/// Pets the watchdog every `every` while [`alive`] passes; runs until aborted.
pub async fn watchdog(db: Db, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive(&db, every).await {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                "the connection pool did not answer a check within {}; not petting the systemd watchdog",
                humantime::format_duration(every)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        assert_eq!(
            half_of(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn watchdog_is_off_without_a_timeout_or_with_zero() {
        assert_eq!(half_of(None), None);
        assert_eq!(half_of(Some(Duration::ZERO)), None);
    }

    #[tokio::test]
    async fn a_pool_whose_database_is_down_still_counts_as_alive() {
        // Nothing listens on port 9 (discard) of localhost in the test environment; the
        // pool answers with an error quickly, which is the service working as designed.
        let db = Db::connect("host=127.0.0.1 port=9 user=nobody dbname=none", 1).expect("pool");
        assert!(alive(&db, Duration::from_secs(30)).await);
    }
}
