//! What the client connections count, and how the controller adds it up.
//!
//! Each client thread owns one `ShardStats` behind a mutex that only its own
//! connections and, once per tick, the `Collector` touch, so recording a
//! delivery is an uncontended lock per socket read, not per frame. Counters
//! are cumulative; histograms are drained into the collector, which keeps a
//! whole-run, a per-window (scenario phase) and a per-tick copy.
//! Loss and duplicates are judged per connection by `SeqTracker`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, up to an hour.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

/// Duplicate detection for one connection's sequence numbers on one channel.
///
/// Sequence numbers start at 0 and arrive nearly in order (a few publishing
/// connections may reorder neighbours), so a 128-wide window above the lowest
/// unseen number is enough; anything below it was seen already.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    base: u64,
    window: u128,
}

impl SeqTracker {
    /// Returns true for the first arrival of `seq`, false for a duplicate.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq < self.base {
            return false;
        }
        let mut offset = seq - self.base;
        if offset >= 128 {
            // Far ahead: give up on the oldest gaps (they count as lost).
            let shift = offset - 127;
            self.window = if shift >= 128 {
                0
            } else {
                self.window >> shift
            };
            self.base += shift;
            offset = 127;
        }
        let bit = 1u128 << offset;
        if self.window & bit != 0 {
            return false;
        }
        self.window |= bit;
        let run = self.window.trailing_ones();
        self.window = if run >= 128 { 0 } else { self.window >> run };
        self.base += u64::from(run);
        true
    }
}

/// Which latency a sample belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Latency {
    /// Publish (scheduled send time) to receipt of a benchmark event.
    Delivery,
    /// Presence: subscribe sent to `subscription_succeeded`.
    Join,
    /// Presence: a member's subscribe to another member's `member_added`.
    MemberAdded,
}

const LATENCY_KINDS: usize = 3;

/// Counters and samples of the connections on one client thread.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub counters: Counters,
    pub close_codes: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    latency: [Histogram<u64>; LATENCY_KINDS],
}

/// Cumulative counters; summed over shards by the collector.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub connected: u64,
    pub connect_failed: u64,
    pub subscribed: u64,
    pub subscribe_failed: u64,
    pub disconnected: u64,
    pub deliveries: u64,
    /// Socket reads that found data: deliveries per read shows whether the
    /// server coalesces frames into one write.
    pub reads: u64,
    pub duplicates: u64,
    pub other_frames: u64,
    pub pings_answered: u64,
    pub member_added: u64,
    pub member_removed: u64,
    /// Presence: member events the churners' joins should have caused.
    pub expected_member_added: u64,
    pub expected_member_removed: u64,
    pub joins: u64,
    pub leaves: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.connected += o.connected;
        self.connect_failed += o.connect_failed;
        self.subscribed += o.subscribed;
        self.subscribe_failed += o.subscribe_failed;
        self.disconnected += o.disconnected;
        self.deliveries += o.deliveries;
        self.reads += o.reads;
        self.duplicates += o.duplicates;
        self.other_frames += o.other_frames;
        self.pings_answered += o.pings_answered;
        self.member_added += o.member_added;
        self.member_removed += o.member_removed;
        self.expected_member_added += o.expected_member_added;
        self.expected_member_removed += o.expected_member_removed;
        self.joins += o.joins;
        self.leaves += o.leaves;
    }
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            counters: Counters::default(),
            close_codes: BTreeMap::new(),
            errors: Vec::new(),
            latency: [new_histogram(), new_histogram(), new_histogram()],
        }
    }
}

impl ShardStats {
    pub fn record_latency(&mut self, kind: Latency, micros: u64) {
        self.latency[kind as usize].saturating_record(micros.max(1));
    }

    /// Keeps the first few distinct error messages for the report.
    pub fn error(&mut self, message: String) {
        if self.errors.len() < 8 && !self.errors.contains(&message) {
            self.errors.push(message);
        }
    }
}

/// A client thread's stats, shared with the collector.
#[derive(Debug, Clone, Default)]
pub struct Shard(Arc<Mutex<ShardStats>>);

impl Shard {
    pub fn lock(&self) -> MutexGuard<'_, ShardStats> {
        // A panicking connection task cannot leave the counters inconsistent
        // in a way that matters to a benchmark, so poisoning is ignored.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Histograms the collector keeps per latency kind.
#[derive(Debug, Clone)]
pub struct LatencySet {
    pub run: Histogram<u64>,
    pub window: Histogram<u64>,
    pub tick: Histogram<u64>,
}

impl Default for LatencySet {
    fn default() -> Self {
        LatencySet {
            run: new_histogram(),
            window: new_histogram(),
            tick: new_histogram(),
        }
    }
}

/// Sums shard stats; lives on the controller thread.
#[derive(Debug)]
pub struct Collector {
    shards: Vec<Shard>,
    pub totals: Counters,
    pub close_codes: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    pub latency: [LatencySet; LATENCY_KINDS],
}

impl Collector {
    pub fn new(shards: Vec<Shard>) -> Self {
        Collector {
            shards,
            totals: Counters::default(),
            close_codes: BTreeMap::new(),
            errors: Vec::new(),
            latency: Default::default(),
        }
    }

    /// Pulls every shard's counters and drains its histograms.
    pub fn collect(&mut self) -> Counters {
        let mut totals = Counters::default();
        let mut codes = BTreeMap::new();
        for shard in &self.shards {
            let mut s = shard.lock();
            totals.add(&s.counters);
            for (code, n) in &s.close_codes {
                *codes.entry(*code).or_insert(0) += n;
            }
            for e in &s.errors {
                if self.errors.len() < 8 && !self.errors.contains(e) {
                    self.errors.push(e.clone());
                }
            }
            for (set, h) in self.latency.iter_mut().zip(s.latency.iter_mut()) {
                if h.is_empty() {
                    continue;
                }
                // Same bounds everywhere, so adding cannot fail.
                let _ = set.run.add(&*h);
                let _ = set.window.add(&*h);
                let _ = set.tick.add(&*h);
                h.reset();
            }
        }
        self.totals = totals;
        self.close_codes = codes;
        totals
    }

    pub fn latency(&self, kind: Latency) -> &LatencySet {
        &self.latency[kind as usize]
    }

    /// Starts a new measurement window (after connecting, per ramp step).
    pub fn reset_window(&mut self) {
        self.collect();
        for set in &mut self.latency {
            set.window.reset();
        }
    }

    /// Percentiles of the last tick, then starts a new tick.
    pub fn take_tick(&mut self, kind: Latency) -> Percentiles {
        let set = &mut self.latency[kind as usize];
        let p = Percentiles::of(&set.tick);
        set.tick.reset();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_sequences_are_all_new() {
        let mut t = SeqTracker::default();
        assert!((0..1000).all(|s| t.record(s)));
        assert!(!t.record(999));
        assert!(!t.record(0));
    }

    #[test]
    fn reordered_neighbours_are_new_and_repeats_are_duplicates() {
        let mut t = SeqTracker::default();
        for s in [1, 0, 3, 2, 5, 4] {
            assert!(t.record(s), "{s}");
        }
        for s in [3, 5, 0] {
            assert!(!t.record(s), "{s}");
        }
        assert!(t.record(6));
    }

    #[test]
    fn gaps_do_not_break_tracking() {
        let mut t = SeqTracker::default();
        assert!(t.record(0));
        assert!(t.record(2)); // 1 lost so far
        assert!(t.record(500)); // jump far ahead
        assert!(!t.record(500));
        assert!(t.record(499));
        assert!(t.record(501));
        assert!(!t.record(2), "left behind the window: treated as seen");
    }

    #[test]
    fn collector_drains_shard_histograms() {
        let shard = Shard::default();
        {
            let mut s = shard.lock();
            s.counters.deliveries = 3;
            for us in [1000, 2000, 3000] {
                s.record_latency(Latency::Delivery, us);
            }
        }
        let mut c = Collector::new(vec![shard.clone()]);
        assert_eq!(c.collect().deliveries, 3);
        let p = Percentiles::of(&c.latency(Latency::Delivery).run);
        assert_eq!(p.count, 3);
        assert!((p.max_ms - 3.0).abs() < 0.01);
        // Drained: collecting again adds nothing.
        c.collect();
        assert_eq!(c.latency(Latency::Delivery).run.len(), 3);
        c.reset_window();
        assert_eq!(c.latency(Latency::Delivery).window.len(), 0);
    }
}
