//! The channel hub: the one owner of this node's *interest* in each channel,
//! meaning how many local holders it has and whether the bus is subscribed.
//!
//! A holder is anything that needs the channel's events here: a socket that
//! is joining or has joined, the watchlist bookkeeping of a signed-in
//! connection, or (once the fan-out is sharded) one shard's subscriber list,
//! which takes one hold when its first subscriber arrives and gives it back
//! when its last one goes. The hub counts holders node-wide; it does not
//! keep the subscriber lists themselves (`registry.rs` does, for fan-out).
//!
//! Each channel is a small state machine, changed only under its shard's
//! lock, and every bus call is made under that same lock, so the bus sees
//! subscribe and unsubscribe in the order the holders came and went:
//!
//! ```text
//!            first join                 confirmed, holders > 0
//!   (none) ─────────────▶ Subscribing ─────────────────────────▶ Subscribed
//!     ▲                    │  │  confirmed, holders = 0             │   ▲
//!     │ bus error:         │  └──────────────────────┐   last leave │   │ join
//!     │ rollback, every    │                         ▼              ▼   │
//!     └────────────────────┘                       Lingering ◀──────────┘
//!     ▲                                               │
//!     └──────── sweep after LINGER: bus.unsubscribe ──┘
//! ```
//!
//! The first holder drives `bus.subscribe`; later ones wait for the same
//! confirmation, so none is told `subscription_succeeded` before the bus
//! confirmed. The last holder does not unsubscribe at once: the channel
//! lingers, and a join in that time finds the subscription still in place.
//! A page that swaps one component for another on a channel, or a second tab
//! that opens as the first closes, costs no Redis round trip and can never
//! be left deaf. After the linger a sweep unsubscribes; a join after that
//! subscribes afresh and waits for its own confirmation.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::{Bus, BusError};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How long a channel without holders keeps its bus subscription.
pub const LINGER: Duration = Duration::from_secs(1);
/// How often lingering channels are looked at; a channel is unsubscribed
/// between `LINGER` and `LINGER + SWEEP_EVERY` after its last holder left.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
const SHARDS: usize = 16;

type Confirmation = Shared<BoxFuture<'static, Result<(), BusError>>>;
/// An app's channel as one allocation, `app NUL channel` (neither part can
/// hold a NUL): an idle node may hold a channel per connection, and two
/// boxed strings cost a pointer pair and an allocation more.
#[derive(PartialEq, Eq, Hash)]
struct Key(Box<str>);

impl Key {
    fn new(app: &str, channel: &str) -> Key {
        let mut s = String::with_capacity(app.len() + 1 + channel.len());
        s.push_str(app);
        s.push('\0');
        s.push_str(channel);
        Key(s.into_boxed_str())
    }

    fn parts(&self) -> (&str, &str) {
        self.0.split_once('\0').unwrap_or((&self.0, ""))
    }
}

enum State {
    /// `bus.subscribe` was called and has not answered; `attempt` tells this
    /// call's answer from a stale one.
    Subscribing {
        attempt: u64,
        confirmed: Confirmation,
    },
    Subscribed,
    /// Subscribed, with no holder since `since`.
    Lingering {
        since: Instant,
    },
}

struct Channel {
    holders: usize,
    state: State,
}

/// What a join has to wait for, decided under the lock.
enum Step {
    Ready,
    Wait {
        attempt: u64,
        confirmed: Confirmation,
    },
}

/// One node's interest in every channel of every app.
pub struct Hub {
    bus: Arc<dyn Bus>,
    linger: Duration,
    shards: Box<[Mutex<HashMap<Key, Channel>>]>,
    hasher: RandomState,
    attempts: AtomicU64,
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>) -> Hub {
        Hub::with_linger(bus, LINGER)
    }

    fn with_linger(bus: Arc<dyn Bus>, linger: Duration) -> Hub {
        Hub {
            bus,
            linger,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            attempts: AtomicU64::new(0),
        }
    }

    fn shard(&self, app: &str, channel: &str) -> &Mutex<HashMap<Key, Channel>> {
        &self.shards[self.hasher.hash_one((app, channel)) as usize % SHARDS]
    }

    /// Takes a hold on `channel` of `app`. The hold is counted when this is
    /// called, not when the future is first polled, so holders are counted in
    /// the order they arrived. The future resolves once the bus confirmed the
    /// subscription. On an error the hold is already given back (and every
    /// other holder waiting on the same confirmation gets the error too):
    /// the caller must not `leave`.
    pub fn join(
        &self,
        app: &str,
        channel: &str,
    ) -> impl std::future::Future<Output = Result<(), BusError>> + Send + '_ {
        let step = self.begin_join(app, channel);
        let key = Key::new(app, channel);
        async move {
            let Step::Wait { attempt, confirmed } = step else {
                return Ok(());
            };
            let outcome = confirmed.await;
            self.settle(&key, attempt, &outcome);
            outcome
        }
    }

    fn begin_join(&self, app: &str, channel: &str) -> Step {
        let mut shard = self.shard(app, channel).lock();
        match shard.entry(Key::new(app, channel)) {
            Entry::Vacant(slot) => {
                let (attempt, confirmed) = self.subscribe(app, channel);
                slot.insert(Channel {
                    holders: 1,
                    state: State::Subscribing {
                        attempt,
                        confirmed: confirmed.clone(),
                    },
                });
                Step::Wait { attempt, confirmed }
            }
            Entry::Occupied(mut slot) => {
                let c = slot.get_mut();
                c.holders += 1;
                match &c.state {
                    State::Subscribing { attempt, confirmed } => Step::Wait {
                        attempt: *attempt,
                        confirmed: confirmed.clone(),
                    },
                    State::Subscribed => Step::Ready,
                    State::Lingering { .. } => {
                        c.state = State::Subscribed;
                        Step::Ready
                    }
                }
            }
        }
    }

    /// Calls the bus; only ever under the channel's shard lock.
    fn subscribe(&self, app: &str, channel: &str) -> (u64, Confirmation) {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed);
        (attempt, self.bus.subscribe(app, channel).shared())
    }

    /// Applies the bus's answer to `attempt`, once: the first of its waiters
    /// to get here does, and an answer to an attempt that is no longer
    /// current changes nothing.
    fn settle(&self, key: &Key, attempt: u64, outcome: &Result<(), BusError>) {
        let (app, channel) = key.parts();
        let mut shard = self.shard(app, channel).lock();
        let Some(c) = shard.get_mut(key) else {
            return;
        };
        if !matches!(c.state, State::Subscribing { attempt: a, .. } if a == attempt) {
            return;
        }
        match outcome {
            Ok(()) if c.holders > 0 => c.state = State::Subscribed,
            Ok(()) => {
                c.state = State::Lingering {
                    since: Instant::now(),
                }
            }
            Err(_) => {
                // Every holder of a subscribing channel waits on this attempt,
                // and each of them now hears the error: none holds any more.
                shard.remove(key);
                // The bus may still mean to subscribe (or retry) this one.
                self.bus.unsubscribe(app, channel);
            }
        }
    }

    /// Gives back a hold taken by a successful `join`. The last one leaves
    /// the channel lingering, subscribed, until the sweep lets go of it.
    pub fn leave(&self, app: &str, channel: &str) {
        let mut shard = self.shard(app, channel).lock();
        let key = Key::new(app, channel);
        let Some(c) = shard.get_mut(&key) else {
            tracing::debug!(app, channel, "hub: leave without a hold");
            return;
        };
        c.holders = c.holders.saturating_sub(1);
        if c.holders == 0 && matches!(c.state, State::Subscribed) {
            c.state = State::Lingering {
                since: Instant::now(),
            };
        }
        // A subscribing channel stays so; its confirmation makes it linger.
    }

    /// Unsubscribes every channel that has lingered `linger` by `now`.
    /// Returns how many it let go.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut released = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|key, c| match c.state {
                State::Lingering { since } if now.duration_since(since) >= self.linger => {
                    let (app, channel) = key.parts();
                    self.bus.unsubscribe(app, channel);
                    released += 1;
                    false
                }
                _ => true,
            });
        }
        released
    }

    /// Sweeps until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.sweep(Instant::now());
        }
    }

    /// Holders of `channel` (joined or joining), for tests and metrics.
    pub fn holders(&self, app: &str, channel: &str) -> usize {
        let key = Key::new(app, channel);
        self.shard(app, channel)
            .lock()
            .get(&key)
            .map_or(0, |c| c.holders)
    }
}

#[cfg(test)]
mod tests {
    //! The hub against a bus whose answers the test hands out, one by one and
    //! in any order, so every interleaving the real Redis bus can produce is
    //! reachable. The bus records each call; what matters is the last call
    //! per channel (the Redis bus keeps "wanted" and acts on the last word).

    use super::*;
    use belfry_coordinator::Envelope;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};
    use tokio::sync::oneshot;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Subscribe(usize),
        Unsubscribe,
    }

    type Answer = oneshot::Sender<Result<(), BusError>>;
    type Joining<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), BusError>> + Send + 'a>>;

    #[derive(Default)]
    struct TestBus {
        calls: Mutex<Vec<(String, Call)>>,
        answers: Mutex<Vec<Option<Answer>>>,
    }

    impl TestBus {
        fn calls(&self, channel: &str) -> Vec<Call> {
            self.calls
                .lock()
                .iter()
                .filter(|(c, _)| c == channel)
                .map(|(_, call)| call.clone())
                .collect()
        }

        fn subscribes(&self) -> usize {
            self.answers.lock().len()
        }

        /// Answers subscribe call `n` (counted from 0 over all channels).
        fn answer(&self, n: usize, outcome: Result<(), BusError>) {
            let tx = self.answers.lock()[n].take();
            if let Some(tx) = tx {
                let _ = tx.send(outcome);
            }
        }

        /// Whether the bus, going by the last call, wants `channel` now.
        fn wanted(&self, channel: &str) -> bool {
            matches!(self.calls(channel).last(), Some(Call::Subscribe(_)))
        }
    }

    impl Bus for TestBus {
        fn subscribe(&self, _app: &str, channel: &str) -> BoxFuture<'static, Result<(), BusError>> {
            let (tx, rx) = oneshot::channel();
            let mut answers = self.answers.lock();
            self.calls
                .lock()
                .push((channel.into(), Call::Subscribe(answers.len())));
            answers.push(Some(tx));
            Box::pin(async move {
                rx.await
                    .unwrap_or_else(|_| Err(BusError::Unavailable("test bus dropped".into())))
            })
        }

        fn unsubscribe(&self, _app: &str, channel: &str) {
            self.calls.lock().push((channel.into(), Call::Unsubscribe));
        }

        fn publish(&self, _: Vec<Envelope>) -> BoxFuture<'static, Result<(), BusError>> {
            Box::pin(async { Ok(()) })
        }

        fn cached(
            &self,
            _: &str,
            _: &str,
        ) -> BoxFuture<'static, Result<Option<Envelope>, BusError>> {
            Box::pin(async { Ok(None) })
        }

        fn is_ready(&self) -> bool {
            true
        }
    }

    fn hub() -> (Arc<TestBus>, Hub) {
        let bus = Arc::new(TestBus::default());
        // No linger: a sweep lets go of every channel without holders.
        (bus.clone(), Hub::with_linger(bus, Duration::ZERO))
    }

    fn down() -> Result<(), BusError> {
        Err(BusError::Unavailable("Redis is down".into()))
    }

    /// Polls once without a runtime: joins resolve as soon as their answer
    /// was handed out, so one poll tells whether a join is still waiting.
    fn poll<F: Future + ?Sized>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(
            futures_util::task::noop_waker_ref(),
        ))
    }

    fn sweep(hub: &Hub) -> usize {
        hub.sweep(Instant::now())
    }

    #[test]
    fn the_first_join_subscribes_and_every_joiner_waits_for_the_confirmation() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        let mut b = pin!(hub.join("app", "c"));
        assert!(poll(a.as_mut()).is_pending());
        assert!(poll(b.as_mut()).is_pending());
        assert_eq!(
            bus.calls("c"),
            [Call::Subscribe(0)],
            "one subscribe for two joiners"
        );
        bus.answer(0, Ok(()));
        assert!(matches!(poll(b.as_mut()), Poll::Ready(Ok(()))));
        assert!(matches!(poll(a.as_mut()), Poll::Ready(Ok(()))));
        // A third joiner finds the channel subscribed.
        assert!(matches!(
            poll(pin!(hub.join("app", "c"))),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(hub.holders("app", "c"), 3);
        assert_eq!(bus.subscribes(), 1);
    }

    #[test]
    fn the_last_leave_unsubscribes_after_the_linger_and_not_before() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        bus.answer(0, Ok(()));
        assert!(poll(a.as_mut()).is_ready());
        assert!(poll(pin!(hub.join("app", "c"))).is_ready());
        hub.leave("app", "c");
        assert_eq!(sweep(&hub), 0, "a holder is left");
        hub.leave("app", "c");
        assert!(bus.wanted("c"), "the last leave lingers");
        let lingering = Hub::with_linger(bus.clone(), Duration::from_secs(3600));
        assert_eq!(lingering.sweep(Instant::now()), 0);
        assert_eq!(sweep(&hub), 1);
        assert_eq!(bus.calls("c"), [Call::Subscribe(0), Call::Unsubscribe]);
        assert_eq!(hub.holders("app", "c"), 0);
        assert_eq!(sweep(&hub), 0, "unsubscribed once");
    }

    #[test]
    fn a_hand_over_in_either_order_keeps_the_subscription() {
        for leave_first in [false, true] {
            let (bus, hub) = hub();
            let mut x = pin!(hub.join("app", "c"));
            bus.answer(0, Ok(()));
            assert!(poll(x.as_mut()).is_ready());
            if leave_first {
                hub.leave("app", "c");
            }
            let mut y = pin!(hub.join("app", "c"));
            if !leave_first {
                hub.leave("app", "c");
            }
            assert!(matches!(poll(y.as_mut()), Poll::Ready(Ok(()))));
            assert_eq!(sweep(&hub), 0, "Y holds the channel");
            assert_eq!(
                bus.calls("c"),
                [Call::Subscribe(0)],
                "no Redis traffic at all"
            );
            assert_eq!(hub.holders("app", "c"), 1);
        }
    }

    #[test]
    fn a_join_after_the_unsubscribe_subscribes_again_and_waits() {
        let (bus, hub) = hub();
        let mut x = pin!(hub.join("app", "c"));
        bus.answer(0, Ok(()));
        assert!(poll(x.as_mut()).is_ready());
        hub.leave("app", "c");
        assert_eq!(sweep(&hub), 1);
        let mut y = pin!(hub.join("app", "c"));
        assert!(
            poll(y.as_mut()).is_pending(),
            "Y waits for its own confirmation"
        );
        assert_eq!(
            bus.calls("c"),
            [Call::Subscribe(0), Call::Unsubscribe, Call::Subscribe(1)]
        );
        bus.answer(1, Ok(()));
        assert!(matches!(poll(y.as_mut()), Poll::Ready(Ok(()))));
        assert!(bus.wanted("c"));
    }

    #[test]
    fn a_bus_error_fails_every_waiter_rolls_back_and_the_next_join_retries() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        let mut b = pin!(hub.join("app", "c"));
        assert!(poll(a.as_mut()).is_pending());
        bus.answer(0, down());
        assert!(matches!(poll(a.as_mut()), Poll::Ready(Err(_))));
        assert!(matches!(poll(b.as_mut()), Poll::Ready(Err(_))));
        assert_eq!(
            hub.holders("app", "c"),
            0,
            "the failed joiners hold nothing"
        );
        assert!(!bus.wanted("c"), "rolled back on the bus");
        let mut c = pin!(hub.join("app", "c"));
        assert!(poll(c.as_mut()).is_pending());
        bus.answer(1, Ok(()));
        assert!(matches!(poll(c.as_mut()), Poll::Ready(Ok(()))));
        assert_eq!(
            bus.calls("c"),
            [Call::Subscribe(0), Call::Unsubscribe, Call::Subscribe(1)]
        );
    }

    #[test]
    fn a_stale_error_arriving_after_a_newer_confirmation_changes_nothing() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        let mut late = pin!(hub.join("app", "c"));
        assert!(poll(a.as_mut()).is_pending());
        bus.answer(0, down());
        // `a` sees the error first and rolls the channel back; `late` has not
        // looked yet when a new joiner subscribes again and is confirmed.
        assert!(matches!(poll(a.as_mut()), Poll::Ready(Err(_))));
        let mut c = pin!(hub.join("app", "c"));
        bus.answer(1, Ok(()));
        assert!(matches!(poll(c.as_mut()), Poll::Ready(Ok(()))));
        assert!(matches!(poll(late.as_mut()), Poll::Ready(Err(_))));
        assert_eq!(hub.holders("app", "c"), 1, "only the new joiner holds");
        assert!(bus.wanted("c"), "the stale error did not unsubscribe");
        assert_eq!(sweep(&hub), 0);
        hub.leave("app", "c");
        assert_eq!(sweep(&hub), 1);
        assert!(!bus.wanted("c"));
    }

    #[test]
    fn a_leave_before_the_confirmation_lingers_once_confirmed() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        assert!(poll(a.as_mut()).is_pending());
        hub.leave("app", "c");
        assert_eq!(
            sweep(&hub),
            0,
            "nothing to unsubscribe before Redis answered"
        );
        bus.answer(0, Ok(()));
        assert!(poll(a.as_mut()).is_ready());
        assert!(bus.wanted("c"));
        assert_eq!(sweep(&hub), 1);
        assert!(!bus.wanted("c"));
    }

    #[test]
    fn errors_on_a_resubscribe_leave_the_bus_unsubscribed() {
        let (bus, hub) = hub();
        let mut x = pin!(hub.join("app", "c"));
        bus.answer(0, Ok(()));
        assert!(poll(x.as_mut()).is_ready());
        hub.leave("app", "c");
        assert_eq!(sweep(&hub), 1);
        let mut y = pin!(hub.join("app", "c"));
        bus.answer(1, down());
        assert!(matches!(poll(y.as_mut()), Poll::Ready(Err(_))));
        assert!(!bus.wanted("c"));
        assert_eq!(sweep(&hub), 0);
    }

    #[test]
    fn channels_and_apps_are_independent() {
        let (bus, hub) = hub();
        let mut a = pin!(hub.join("app", "c"));
        let mut b = pin!(hub.join("app", "d"));
        let mut c = pin!(hub.join("other", "c"));
        assert_eq!(bus.subscribes(), 3);
        bus.answer(1, down());
        assert!(matches!(poll(b.as_mut()), Poll::Ready(Err(_))));
        assert!(poll(a.as_mut()).is_pending());
        assert!(poll(c.as_mut()).is_pending());
        bus.answer(0, Ok(()));
        bus.answer(2, Ok(()));
        assert!(matches!(poll(a.as_mut()), Poll::Ready(Ok(()))));
        assert!(matches!(poll(c.as_mut()), Poll::Ready(Ok(()))));
        assert_eq!(hub.holders("app", "c"), 1);
        assert_eq!(hub.holders("other", "c"), 1);
        assert_eq!(hub.holders("app", "d"), 0);
    }

    /// A small deterministic generator, so a failing schedule can be replayed.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Random schedules of joins, leaves, sweeps and bus answers in any
    /// order. After every step: a holder told "subscribed" finds the bus
    /// wanting the channel, at most one subscribe is unanswered, and once
    /// everything settled the bus wants the channel exactly when someone
    /// holds it.
    #[test]
    fn random_schedules_keep_the_bus_in_step_with_the_holders() {
        for seed in 1..300u64 {
            let (bus, hub) = hub();
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut waiting: Vec<Joining<'_>> = Vec::new();
            let mut joined = 0usize;
            for step in 0..60 {
                match rng.below(5) {
                    0 | 1 => waiting.push(Box::pin(hub.join("app", "c"))),
                    2 if joined > 0 => {
                        hub.leave("app", "c");
                        joined -= 1;
                    }
                    3 => {
                        let open: Vec<usize> = (0..bus.subscribes())
                            .filter(|n| bus.answers.lock()[*n].is_some())
                            .collect();
                        if !open.is_empty() {
                            let n = open[rng.below(open.len())];
                            bus.answer(n, if rng.below(3) == 0 { down() } else { Ok(()) });
                        }
                    }
                    _ => {
                        sweep(&hub);
                    }
                }
                // Waiters look at their answers in a random order.
                let mut i = 0;
                while i < waiting.len() {
                    if rng.below(2) == 0 {
                        i += 1;
                        continue;
                    }
                    match poll(waiting[i].as_mut()) {
                        Poll::Ready(Ok(())) => {
                            assert!(
                                bus.wanted("c"),
                                "seed {seed} step {step}: told subscribed, bus not wanting"
                            );
                            joined += 1;
                            drop(waiting.swap_remove(i));
                        }
                        Poll::Ready(Err(_)) => drop(waiting.swap_remove(i)),
                        Poll::Pending => i += 1,
                    }
                }
                let open = bus.answers.lock().iter().filter(|a| a.is_some()).count();
                assert!(
                    open <= 1,
                    "seed {seed} step {step}: two subscribes in flight"
                );
                assert!(
                    hub.holders("app", "c") >= joined,
                    "seed {seed} step {step}: holders under the joined count"
                );
            }
            // Settle: answer everything, let every waiter look, then sweep.
            for n in 0..bus.subscribes() {
                bus.answer(n, Ok(()));
            }
            for mut w in waiting.drain(..) {
                if let Poll::Ready(Ok(())) = poll(w.as_mut()) {
                    joined += 1;
                }
            }
            sweep(&hub);
            assert_eq!(hub.holders("app", "c"), joined, "seed {seed}");
            assert_eq!(
                bus.wanted("c"),
                joined > 0,
                "seed {seed}: bus in step with the holders"
            );
        }
    }
}
