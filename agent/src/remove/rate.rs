//! A token bucket limiting removals to a number of entries per second, shared by every thread
//! of every removal given the same [`RateLimit`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where the bucket reads time and how it waits; tests substitute a simulated clock.
pub(crate) trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
    fn sleep(&self, wait: Duration);
}

struct WallClock {
    origin: Instant,
}

impl Clock for WallClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
    fn sleep(&self, wait: Duration) {
        std::thread::sleep(wait);
    }
}

struct Bucket {
    /// Tokens available; negative when callers have reserved tokens they are waiting for.
    tokens: f64,
    last: Duration,
}

struct Shared {
    per_second: f64,
    burst: f64,
    clock: Box<dyn Clock>,
    bucket: Mutex<Bucket>,
    throttled_nanos: AtomicU64,
}

/// A budget of removed entries per second. Clones share one budget: give the same value to
/// every concurrent removal that must together stay under the rate.
#[derive(Clone)]
pub struct RateLimit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("per_second", &self.shared.per_second)
            .field("burst", &self.shared.burst)
            .finish()
    }
}

impl RateLimit {
    /// At most `entries` removals per second, with a burst of a tenth of a second's worth.
    /// `0` means unlimited and gives `None`.
    pub fn per_second(entries: u64) -> Option<RateLimit> {
        (entries > 0).then(|| RateLimit::with_burst(entries, (entries / 10).max(1)))
    }

    /// At most `entries_per_second` removals per second on average, up to `burst` at once
    /// after a pause. Both are raised to at least 1.
    pub fn with_burst(entries_per_second: u64, burst: u64) -> RateLimit {
        RateLimit::with_clock(
            entries_per_second,
            burst,
            Box::new(WallClock {
                origin: Instant::now(),
            }),
        )
    }

    pub(crate) fn with_clock(
        entries_per_second: u64,
        burst: u64,
        clock: Box<dyn Clock>,
    ) -> RateLimit {
        let burst = burst.max(1) as f64;
        let last = clock.now();
        RateLimit {
            shared: Arc::new(Shared {
                per_second: entries_per_second.max(1) as f64,
                burst,
                clock,
                bucket: Mutex::new(Bucket {
                    tokens: burst,
                    last,
                }),
                throttled_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Total time every removal sharing this budget has waited for it, summed over threads.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.shared.throttled_nanos.load(Ordering::Relaxed))
    }

    /// How many tokens a thread takes at a time, so the shared lock is not taken per entry.
    pub(crate) fn chunk(&self) -> u64 {
        (self.shared.burst as u64).clamp(1, 64)
    }

    /// Takes `n` tokens, waiting until the budget allows them; returns how long it waited.
    pub(crate) fn acquire(&self, n: u64) -> Duration {
        let s = &*self.shared;
        let wait = {
            let mut b = s.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let now = s.clock.now();
            let refill = now.saturating_sub(b.last).as_secs_f64() * s.per_second;
            b.tokens = (b.tokens + refill).min(s.burst);
            b.last = now;
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / s.per_second)
            }
        };
        if !wait.is_zero() {
            s.clock.sleep(wait);
            let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
            s.throttled_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        wait
    }
}

/// One thread's share of a [`RateLimit`]: takes tokens from the shared bucket in chunks.
pub(crate) struct Meter<'a> {
    limit: Option<&'a RateLimit>,
    credit: u64,
    pub throttled: Duration,
}

impl<'a> Meter<'a> {
    pub fn new(limit: Option<&'a RateLimit>) -> Self {
        Meter {
            limit,
            credit: 0,
            throttled: Duration::ZERO,
        }
    }

    /// Accounts for one entry about to be removed, waiting for budget if needed.
    #[inline]
    pub fn take_one(&mut self) {
        let Some(limit) = self.limit else { return };
        if self.credit == 0 {
            let chunk = limit.chunk();
            self.throttled += limit.acquire(chunk);
            self.credit = chunk;
        }
        self.credit -= 1;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A clock that only moves when someone sleeps on it.
    #[derive(Default, Clone)]
    pub(crate) struct SimulatedClock(pub Arc<AtomicU64>);

    impl Clock for SimulatedClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
        fn sleep(&self, wait: Duration) {
            let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
            self.0.fetch_add(nanos, Ordering::SeqCst);
        }
    }

    #[test]
    fn burst_is_free_and_the_rest_waits_at_the_rate() {
        let clock = SimulatedClock::default();
        let limit = RateLimit::with_clock(100, 10, Box::new(clock.clone()));
        let mut meter = Meter::new(Some(&limit));
        for _ in 0..10 {
            meter.take_one();
        }
        assert_eq!(meter.throttled, Duration::ZERO, "the burst costs no wait");
        for _ in 0..200 {
            meter.take_one();
        }
        // 200 more entries at 100/s need 2 s of budget.
        let secs = meter.throttled.as_secs_f64();
        assert!((secs - 2.0).abs() < 1e-6, "waited {secs} s");
        assert_eq!(limit.throttled(), meter.throttled);
        assert_eq!(
            clock.now(),
            meter.throttled,
            "time passed only while waiting"
        );
    }

    #[test]
    fn zero_rate_means_unlimited() {
        assert!(RateLimit::per_second(0).is_none());
        let mut meter = Meter::new(None);
        for _ in 0..1000 {
            meter.take_one();
        }
        assert_eq!(meter.throttled, Duration::ZERO);
    }
}
