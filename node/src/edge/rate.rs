//! Rate and concurrency limits: a token bucket, the per-address WebSocket
//! limits (connections at once and new connections a minute), and the
//! per-app HTTP API rate. Limits are per node (see docs/operations.md for
//! why not cluster-wide).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::address::limit_key;

/// Tokens refill continuously at `per_sec` up to `capacity`; each admission
/// takes one. A full bucket lets a burst of `capacity` through at once.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(capacity: f64, now: Instant) -> Self {
        Self {
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, capacity: f64, per_sec: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(capacity);
        self.last = now;
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, capacity: f64, per_sec: f64, now: Instant) -> Result<(), Duration> {
        self.refill(capacity, per_sec, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_sec))
        }
    }

    fn is_full(&mut self, capacity: f64, per_sec: f64, now: Instant) -> bool {
        self.refill(capacity, per_sec, now);
        self.tokens >= capacity
    }
}

/// Whole seconds for `Retry-After`, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// Why a WebSocket handshake from one address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// `max_connections_per_ip` are open already.
    TooMany,
    /// Over `connections_per_ip_per_minute`; a token is due after this long.
    TooFast(Duration),
}

impl IpRefusal {
    /// The label of `belfry_connections_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            IpRefusal::TooMany => "ip_connections",
            IpRefusal::TooFast(_) => "ip_rate",
        }
    }

    pub fn retry_after_secs(&self) -> u64 {
        match self {
            // A slot frees when someone leaves, which we cannot predict.
            IpRefusal::TooMany => 5,
            IpRefusal::TooFast(wait) => retry_after_secs(*wait),
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            IpRefusal::TooMany => "Too many connections from this address",
            IpRefusal::TooFast(_) => "Too many new connections from this address; retry later",
        }
    }
}

struct Entry {
    open: usize,
    bucket: TokenBucket,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<IpAddr, Entry>,
    /// Size at which idle entries are next swept out.
    sweep_at: usize,
}

const SHARDS: usize = 16;
const MIN_SWEEP: usize = 256;

/// Per-address WebSocket limits. An address with no open connection and a
/// full bucket is forgotten, so the table holds only addresses that are
/// connected or were busy within the last minute.
pub struct PerIpLimiter {
    max_open: usize,
    per_minute: u32,
    shards: Vec<Mutex<Shard>>,
}

/// One admitted connection's place in its address's count; giving it back
/// happens on drop, however the connection ends.
pub struct IpSlot {
    limiter: Option<(Arc<PerIpLimiter>, IpAddr)>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((limiter, key)) = self.limiter.take() {
            limiter.release(key);
        }
    }
}

impl PerIpLimiter {
    /// `0` turns either limit off.
    pub fn new(max_open: usize, per_minute: u32) -> Arc<Self> {
        Arc::new(Self {
            max_open,
            per_minute,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        })
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<Shard> {
        use std::hash::{Hash, Hasher};
        let mut h = FxLike(0);
        key.hash(&mut h);
        // The high bits of a multiplicative hash depend on every input byte.
        &self.shards[(h.finish() >> 60) as usize % SHARDS]
    }

    fn capacity(&self) -> f64 {
        f64::from(self.per_minute)
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    /// Counts a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<IpSlot, IpRefusal> {
        if self.max_open == 0 && self.per_minute == 0 {
            return Ok(IpSlot { limiter: None });
        }
        let key = limit_key(ip);
        let (capacity, per_sec) = (self.capacity(), self.per_sec());
        let mut shard = self.shard(&key).lock();
        if shard.entries.len() >= shard.sweep_at.max(MIN_SWEEP) {
            shard.entries.retain(|_, e| {
                e.open > 0 || (capacity > 0.0 && !e.bucket.is_full(capacity, per_sec, now))
            });
            shard.sweep_at = (shard.entries.len() * 2).max(MIN_SWEEP);
        }
        let entry = shard.entries.entry(key).or_insert_with(|| Entry {
            open: 0,
            bucket: TokenBucket::full(capacity, now),
        });
        if self.max_open > 0 && entry.open >= self.max_open {
            return Err(IpRefusal::TooMany);
        }
        if self.per_minute > 0 {
            entry
                .bucket
                .take(capacity, per_sec, now)
                .map_err(IpRefusal::TooFast)?;
        }
        entry.open += 1;
        Ok(IpSlot {
            limiter: Some((self.clone(), key)),
        })
    }

    fn release(&self, key: IpAddr) {
        let mut shard = self.shard(&key).lock();
        if let Some(e) = shard.entries.get_mut(&key) {
            e.open = e.open.saturating_sub(1);
        }
    }

    /// Connections open from `ip` (for tests and logs).
    pub fn open(&self, ip: IpAddr) -> usize {
        let key = limit_key(ip);
        let shard = self.shard(&key).lock();
        shard.entries.get(&key).map_or(0, |e| e.open)
    }
}

/// A small multiplicative hasher, enough to spread addresses over shards.
struct FxLike(u64);

impl std::hash::Hasher for FxLike {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

/// `api_requests_per_second` of every app: a bucket holding one second's
/// worth, so short bursts pass and a sustained flood is cut to the rate.
pub struct ApiRates {
    buckets: HashMap<String, (f64, Mutex<TokenBucket>)>,
}

impl ApiRates {
    pub fn new<'a>(apps: impl Iterator<Item = (&'a str, u32)>, now: Instant) -> Self {
        let buckets = apps
            .filter(|(_, rate)| *rate > 0)
            .map(|(id, rate)| {
                let rate = f64::from(rate);
                (
                    id.to_owned(),
                    (rate, Mutex::new(TokenBucket::full(rate, now))),
                )
            })
            .collect();
        Self { buckets }
    }

    /// Takes one request of `app`'s budget, or says how long to wait.
    pub fn take(&self, app: &str, now: Instant) -> Result<(), Duration> {
        match self.buckets.get(app) {
            None => Ok(()),
            Some((rate, bucket)) => bucket.lock().take(*rate, *rate, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_of_the_minute_budget_passes_then_the_rate_applies() {
        let limiter = PerIpLimiter::new(0, 60);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..60)
            .map(|_| limiter.admit(ip("192.0.2.1"), t0).unwrap())
            .collect();
        let refused = limiter.admit(ip("192.0.2.1"), t0).err().unwrap();
        assert_eq!(refused.reason(), "ip_rate");
        assert_eq!(refused.retry_after_secs(), 1);
        // Another address is not affected.
        assert!(limiter.admit(ip("192.0.2.2"), t0).is_ok());
        // One a second comes back.
        assert!(limiter
            .admit(ip("192.0.2.1"), t0 + Duration::from_millis(1001))
            .is_ok());
        drop(slots);
    }

    #[test]
    fn connections_at_once_are_capped_and_freed_on_drop() {
        let limiter = PerIpLimiter::new(2, 0);
        let now = Instant::now();
        let a = limiter.admit(ip("2001:db8::1"), now).unwrap();
        let _b = limiter.admit(ip("2001:db8::2"), now).unwrap();
        // Same /64.
        assert_eq!(
            limiter.admit(ip("2001:db8::3"), now).err(),
            Some(IpRefusal::TooMany)
        );
        drop(a);
        assert_eq!(limiter.open(ip("2001:db8::9")), 1);
        assert!(limiter.admit(ip("2001:db8::3"), now).is_ok());
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let limiter = PerIpLimiter::new(10, 600);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            let addr = IpAddr::V4((0x0A00_0000 + i).into());
            drop(limiter.admit(addr, t0).unwrap());
        }
        // A minute later every bucket is full again and nobody is connected.
        let later = t0 + Duration::from_secs(61);
        for i in 0..5000u32 {
            let addr = IpAddr::V4((0x0B00_0000 + i).into());
            drop(limiter.admit(addr, later).unwrap());
        }
        let total: usize = limiter.shards.iter().map(|s| s.lock().entries.len()).sum();
        assert!(total < 8000, "{total} entries kept");
    }

    #[test]
    fn api_rate_per_app() {
        let now = Instant::now();
        let rates = ApiRates::new([("a", 5), ("b", 0)].into_iter(), now);
        for _ in 0..5 {
            assert!(rates.take("a", now).is_ok());
        }
        let wait = rates.take("a", now).unwrap_err();
        assert_eq!(retry_after_secs(wait), 1);
        for _ in 0..1000 {
            assert!(rates.take("b", now).is_ok());
        }
        assert!(rates.take("a", now + Duration::from_millis(250)).is_ok());
    }
}
