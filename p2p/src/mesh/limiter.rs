//! The node-wide upload limits: a byte-rate limiter and a bound on concurrent uploads.
//!
//! Sharing chunks with other agents must never starve an agent's own work, so every
//! byte this node uploads passes through one [`RateLimiter`] (a token bucket shared by
//! all uploads), and at most [`UploadSlots`] uploads run at once.
//!
//! # The token bucket
//!
//! [`TokenBucket`] is the sans-IO core: it has no clock, the caller passes a monotonic
//! `now`. Tokens (bytes) refill continuously at `rate` bytes per second up to `burst`;
//! [`TokenBucket::take`] reserves a request and answers how long to wait before sending
//! it. The arithmetic is exact integers (token balance in byte·ns/s), so there is no
//! drift: a caller that always waits the answer sends at exactly `rate` in the long run.
//!
//! # Why debt is allowed
//!
//! A chunk is sent as one message (typically 1 MiB), while a sensible burst may be much
//! smaller (say 16 KiB, to keep the link smooth). A classic bucket that only lets a
//! request through once `bytes` tokens are *available* would deadlock on a chunk larger
//! than the burst: the tokens are capped below what it needs. Here a request is always
//! reserved at once and the balance may go negative (debt); its wait is the time for
//! the balance to climb back to zero, `(bytes - tokens) / rate`. So:
//!
//! - every wait is finite and proportional to what is ahead of it — at most
//!   `(bytes + debt) / rate`, where `debt` is what earlier, still waiting requests
//!   reserved;
//! - the long-run rate is exactly `rate`, whatever the burst and chunk sizes (no
//!   rounding of chunks to bursts, no lost refill while a large chunk waits);
//! - in any time window, the bytes released exceed `rate × window` by at most one
//!   burst plus one request.
//!
//! # Memory and latency bounds
//!
//! The limiter holds no data: a waiting upload keeps only its own chunk. Debt is created
//! only by requests that are waiting, and [`UploadSlots`] bounds how many uploads run
//! at once, so with `slots` slots and chunks of `chunk` bytes the debt stays below
//! `slots × chunk`, the memory held by waiting uploads below `slots × chunk`, and every
//! wait below `slots × chunk / rate` (8 slots of 1 MiB at 8 MiB/s: at most 1 s). When
//! all slots are busy, a new request is refused at once ([`UploadSlots::try_acquire`]
//! returns `None`, the peer hears "busy" and asks another peer) rather than queued
//! without bound.
//!
//! A reservation is not refunded: if an [`RateLimiter::acquire`] future is dropped
//! while it sleeps, its bytes stay counted, which errs on the side of the node's own
//! work.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Token units per byte: the balance is kept in byte·ns/s, so `rate` bytes/s refills
/// exactly `rate` units per nanosecond.
const UNITS_PER_BYTE: i128 = 1_000_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A token bucket without a clock of its own: `rate` bytes per second, up to `burst`
/// bytes of saved-up allowance, and debt for requests larger than what is available.
///
/// See the [module docs](self) for the design. A new bucket starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; 0 means unlimited.
    rate: u64,
    /// Most bytes the bucket saves up.
    burst: u64,
    /// Balance in byte·ns/s ([`UNITS_PER_BYTE`] per byte); negative is debt.
    tokens: i128,
    /// The latest `now` seen, in nanoseconds; `None` before the first call.
    last_ns: Option<u128>,
}

impl TokenBucket {
    /// A bucket that refills at `rate_bytes_per_s` and saves up at most `burst_bytes`.
    /// A rate of 0 means unlimited. A burst of 0 is allowed: every request then waits
    /// `bytes / rate`.
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64) -> Self {
        Self {
            rate: rate_bytes_per_s,
            burst: burst_bytes,
            tokens: Self::units(burst_bytes),
            last_ns: None,
        }
    }

    /// An unlimited bucket: every [`take`](Self::take) answers zero.
    pub fn unlimited() -> Self {
        Self::new(0, 0)
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The burst in bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Whether the bucket lets everything through at once.
    pub fn is_unlimited(&self) -> bool {
        self.rate == 0
    }

    /// Reserves `bytes` at time `now` and returns how long the caller must wait before
    /// sending them (zero if they may go now).
    ///
    /// The reservation is made immediately, even into debt, so a request larger than
    /// the burst is never refused or starved; its wait is the time for the balance to
    /// climb back to zero. `now` is monotonic time since an arbitrary origin; a `now`
    /// earlier than a previous one is treated as no time passing.
    #[must_use = "the caller must wait the returned time before sending"]
    pub fn take(&mut self, now: Duration, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens = self.tokens.saturating_sub(Self::units(bytes));
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        let nanos = self.tokens.unsigned_abs().div_ceil(u128::from(self.rate));
        let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
        // The remainder is below 10^9 and fits a u32.
        Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
    }

    /// How long a reservation made at `now` would wait before its first byte may go: the
    /// time for the debt of earlier reservations to be paid off (zero without debt).
    pub fn backlog(&mut self, now: Duration) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        let nanos = self.tokens.unsigned_abs().div_ceil(u128::from(self.rate));
        let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
        Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
    }

    /// Gives back a reservation of `bytes` that will not be sent (the balance never
    /// rises above the burst).
    pub fn refund(&mut self, bytes: u64) {
        let cap = Self::units(self.burst);
        self.tokens = self.tokens.saturating_add(Self::units(bytes)).min(cap);
    }

    /// Adds the tokens earned since the last call, capped at the burst.
    fn refill(&mut self, now: Duration) {
        let now_ns = now.as_nanos();
        let Some(last_ns) = self.last_ns else {
            self.last_ns = Some(now_ns);
            return;
        };
        let elapsed = now_ns.saturating_sub(last_ns);
        self.last_ns = Some(last_ns.max(now_ns));
        let cap = Self::units(self.burst);
        if self.tokens >= cap {
            return;
        }
        let room = cap.abs_diff(self.tokens);
        let earned = u128::from(self.rate).saturating_mul(elapsed);
        if earned >= room {
            self.tokens = cap;
        } else {
            // Below `cap`, so no overflow.
            self.tokens = self.tokens.saturating_add_unsigned(earned);
        }
    }

    /// `bytes` in balance units.
    fn units(bytes: u64) -> i128 {
        i128::from(bytes) * UNITS_PER_BYTE
    }
}

/// The node-wide upload rate limiter: a [`TokenBucket`] behind a mutex, on the tokio
/// clock. Cheap to clone; clones share the bucket.
///
/// The lock is held only to compute a wait, never across the sleep.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rate: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    /// The bucket's time origin, set at the first acquisition (so that it is read from
    /// the clock of the runtime that uses the limiter, paused or not).
    origin: Option<Instant>,
}

impl RateLimiter {
    /// A limiter of `rate_bytes_per_s` (0: unlimited) with `burst_bytes` of burst.
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                rate: rate_bytes_per_s,
                state: Mutex::new(State {
                    bucket: TokenBucket::new(rate_bytes_per_s, burst_bytes),
                    origin: None,
                }),
            }),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> Self {
        Self::new(0, 0)
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.inner.rate
    }

    /// How long bytes reserved now would wait behind those reserved before them.
    pub fn backlog(&self) -> Duration {
        if self.inner.rate == 0 {
            return Duration::ZERO;
        }
        self.with_bucket(TokenBucket::backlog)
    }

    /// Runs `f` on the bucket at the current time on the bucket's clock (the lock is
    /// held only for `f`).
    fn with_bucket<R>(&self, f: impl FnOnce(&mut TokenBucket, Duration) -> R) -> R {
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let origin = *state.origin.get_or_insert(now);
        f(&mut state.bucket, now.saturating_duration_since(origin))
    }

    /// Waits until `bytes` may be sent, then returns; the caller sends right after.
    ///
    /// Concurrent callers are served in the order they call (each waits behind the
    /// bytes reserved before it). Dropping the future while it waits does not refund
    /// the reservation.
    pub async fn acquire(&self, bytes: u64) {
        if self.inner.rate == 0 {
            return;
        }
        let wait = self.with_bucket(|bucket, now| bucket.take(now, bytes));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl RateLimiter {
    /// [`RateLimiter::acquire`] unless `cancel` fires first: then the reservation is
    /// given back (later callers may send sooner) and false is returned.
    pub async fn acquire_unless(
        &self,
        bytes: u64,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> bool {
        if cancel.is_cancelled() {
            return false;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                self.inner
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .bucket
                    .refund(bytes);
                false
            }
            _ = self.acquire(bytes) => true,
        }
    }
}

/// A bound on concurrent uploads. Cheap to clone; clones share the slots.
#[derive(Debug, Clone)]
pub struct UploadSlots {
    semaphore: Arc<Semaphore>,
    max: usize,
}

/// One busy upload slot; dropping it frees the slot.
#[derive(Debug)]
#[must_use = "the slot is freed as soon as the guard is dropped"]
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
}

impl UploadSlots {
    /// At most `max` concurrent uploads (clamped to [`Semaphore::MAX_PERMITS`]). With 0,
    /// every request is refused: the node shares nothing.
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Takes a free slot, or `None` when all are busy — the caller then answers "busy"
    /// instead of queueing the request.
    pub fn try_acquire(&self) -> Option<UploadSlot> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| UploadSlot { _permit: permit })
    }

    /// Slots currently held.
    pub fn in_use(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }

    /// The number of slots.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backlog_is_the_wait_behind_earlier_reservations() {
        let mut b = TokenBucket::new(1000, 0);
        assert_eq!(b.backlog(Duration::ZERO), Duration::ZERO);
        assert_eq!(b.take(Duration::ZERO, 500), Duration::from_millis(500));
        assert_eq!(b.backlog(Duration::ZERO), Duration::from_millis(500));
        assert_eq!(
            b.backlog(Duration::from_millis(300)),
            Duration::from_millis(200)
        );
        assert_eq!(b.backlog(Duration::from_millis(600)), Duration::ZERO);
        assert_eq!(
            TokenBucket::unlimited().backlog(Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn a_refund_shortens_the_next_wait_and_never_exceeds_the_burst() {
        let mib = 1u64 << 20;
        let mut b = TokenBucket::new(mib, mib);
        let t0 = Duration::ZERO;
        assert_eq!(b.take(t0, 3 * mib), Duration::from_secs(2));
        b.refund(2 * mib);
        assert_eq!(
            b.take(t0, mib),
            Duration::from_secs(1),
            "without the refund: 3 s"
        );
        let mut full = TokenBucket::new(mib, mib);
        full.refund(10 * mib);
        assert_eq!(full.take(t0, mib), Duration::ZERO);
        assert_eq!(
            full.take(t0, mib),
            Duration::from_secs(1),
            "the burst caps a refund"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_acquisition_gives_its_reservation_back() {
        let mib = 1u64 << 20;
        let limiter = RateLimiter::new(mib, mib);
        limiter.acquire(mib).await; // the burst
        let cancel = tokio_util::sync::CancellationToken::new();
        let waiting = {
            let (limiter, cancel) = (limiter.clone(), cancel.clone());
            tokio::spawn(async move { limiter.acquire_unless(4 * mib, &cancel).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        assert!(!waiting.await.unwrap(), "cancelled");
        let started = Instant::now();
        limiter.acquire(mib).await;
        let waited = started.elapsed();
        assert!(
            waited <= Duration::from_secs(1),
            "waited {waited:?}: the 4 MiB were not refunded"
        );
    }

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    fn secs_f64(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    /// Bytes in balance units, as the tests compare in those exact units.
    fn u(bytes: u64) -> i128 {
        i128::from(bytes) * UNITS_PER_BYTE
    }

    /// A caller that always waits the answer, sending `sizes` in turn until it has sent
    /// `total` bytes. Returns (release time, bytes) of every request.
    fn saturated_run(bucket: &mut TokenBucket, sizes: &[u64], total: u64) -> Vec<(u128, u64)> {
        let mut now = Duration::ZERO;
        let mut sent = 0;
        let mut releases = Vec::new();
        for &bytes in sizes.iter().cycle() {
            if sent >= total {
                break;
            }
            now += bucket.take(now, bytes);
            sent += bytes;
            releases.push((now.as_nanos(), bytes));
        }
        releases
    }

    #[test]
    fn a_chunk_larger_than_the_burst_waits_for_the_difference() {
        let mut b = TokenBucket::new(8 * MIB, 16 * KIB);
        let wait = b.take(Duration::ZERO, MIB);
        assert_eq!(
            wait.as_nanos(),
            u128::from(MIB - 16 * KIB) * NANOS_PER_SEC / 8 / u128::from(MIB)
        );
        // The next chunk, taken once the first went out, waits a full chunk's time.
        assert_eq!(b.take(wait, MIB), Duration::from_millis(125));
    }

    #[test]
    fn within_the_burst_is_immediate_and_refill_is_capped() {
        let mut b = TokenBucket::new(MIB, 64 * KIB);
        assert_eq!(b.take(Duration::ZERO, 64 * KIB), Duration::ZERO);
        assert!(b.take(Duration::ZERO, 1) > Duration::ZERO);
        // A long idle period refills only up to the burst.
        let later = Duration::from_secs(3600);
        assert_eq!(b.take(later, 64 * KIB), Duration::ZERO);
        assert!(b.take(later, 1) > Duration::ZERO);
    }

    #[test]
    fn concurrent_reservations_queue_behind_each_other() {
        let mut b = TokenBucket::new(MIB, 0);
        let waits: Vec<Duration> = (0..4).map(|_| b.take(Duration::ZERO, MIB)).collect();
        assert_eq!(waits, (1..=4).map(Duration::from_secs).collect::<Vec<_>>());
    }

    #[test]
    fn time_going_backwards_and_huge_values_do_not_panic() {
        let mut b = TokenBucket::new(1, 0);
        let _ = b.take(Duration::from_secs(10), 5);
        assert_eq!(b.take(Duration::from_secs(1), 0), Duration::from_secs(5));
        let mut b = TokenBucket::new(u64::MAX, u64::MAX);
        for _ in 0..3 {
            let _ = b.take(Duration::MAX, u64::MAX);
        }
        let mut b = TokenBucket::new(1, u64::MAX);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            let wait = b.take(Duration::ZERO, u64::MAX);
            assert!(wait >= last);
            last = wait;
        }
    }

    /// The async scenario below, in virtual time: 64 × 1 MiB at 8 MiB/s with a 64 KiB
    /// burst take 8 s less the burst's worth.
    #[test]
    fn sixty_four_chunks_at_eight_mib_per_second_take_eight_seconds() {
        let mut b = TokenBucket::new(8 * MIB, 64 * KIB);
        let releases = saturated_run(&mut b, &[MIB], 64 * MIB);
        assert_eq!(releases.len(), 64);
        let end = releases.last().unwrap().0;
        assert_eq!(end, 8 * NANOS_PER_SEC - NANOS_PER_SEC / 128);
    }

    fn burst_for(chunk: u64) -> impl Strategy<Value = u64> {
        prop_oneof![Just(16 * KIB), 0..=chunk / 8, 0..=8 * chunk]
    }

    proptest! {
        /// A caller that always waits reaches the rate — even when the burst is far
        /// below the chunk size — and never exceeds it by more than one burst plus one
        /// request over any window.
        #[test]
        fn a_waiting_caller_gets_the_rate_and_no_more(
            rate in 1u64..=(1 << 30),
            (chunk, burst) in (4 * KIB..=2 * MIB).prop_flat_map(|c| (Just(c), burst_for(c))),
            fractions in proptest::collection::vec(50u64..=100, 1..16),
        ) {
            let sizes: Vec<u64> = fractions.iter().map(|f| chunk * f / 100).collect();
            let max_req = *sizes.iter().max().unwrap();
            let mut bucket = TokenBucket::new(rate, burst);
            let total = 40 * (burst + chunk);
            let releases = saturated_run(&mut bucket, &sizes, total);

            let sent: u64 = releases.iter().map(|r| r.1).sum();
            let end = releases.last().unwrap().0;
            let n = releases.len() as u128;
            // Not lower than the rate: exactly `burst + rate × end`, less at most one
            // nanosecond of refill per request lost to rounding waits up.
            prop_assert!(
                u(sent) + i128::from(rate) * n as i128 >= i128::from(rate) * end as i128,
                "sent {sent} in {end} ns at {rate} B/s"
            );
            // Within a few percent over a long run.
            let achieved = sent as f64 / (end as f64 / 1e9);
            prop_assert!(end == 0 || achieved <= rate as f64 * 1.03, "{achieved} B/s for {rate}");

            // Over any window [t_i, t_j]: bytes(i..=j) ≤ rate × (t_j − t_i) + burst + max_req.
            // With prefix sums P, that is P(j) − rate·t_j + max_{i≤j}(rate·t_i − P(i−1)) ≤ bound.
            let bound = u(burst) + u(max_req);
            let mut prefix = 0i128;
            let mut best = i128::MIN;
            for &(t, bytes) in &releases {
                best = best.max(i128::from(rate) * t as i128 - prefix);
                prefix += u(bytes);
                let excess = prefix - i128::from(rate) * t as i128 + best;
                prop_assert!(excess <= bound, "window exceeds the rate by {} bytes", excess / UNITS_PER_BYTE);
            }
        }

        /// Waits are never absurd: bounded by (bytes + debt) / rate, rounded up to a
        /// nanosecond, and never shorter than what the bucket cannot cover.
        #[test]
        fn waits_are_bounded_by_bytes_plus_debt(
            rate in 1u64..=(1 << 30),
            burst in 0u64..=4 * MIB,
            ops in proptest::collection::vec((prop_oneof![Just(0u64), 0u64..=2_000_000_000], 0u64..=4 * MIB), 1..200),
        ) {
            let mut bucket = TokenBucket::new(rate, burst);
            let mut now = Duration::ZERO;
            for (advance, bytes) in ops {
                now += Duration::from_nanos(advance);
                bucket.refill(now);
                let balance = bucket.tokens;
                let debt = (-balance).max(0);
                let wait = bucket.take(now, bytes).as_nanos() as i128;
                let upper = (u(bytes) + debt + i128::from(rate) - 1) / i128::from(rate);
                prop_assert!(wait <= upper, "wait {wait} ns > {upper} ns");
                let lower = (u(bytes) - balance) / i128::from(rate);
                prop_assert!(wait >= lower, "wait {wait} ns < {lower} ns");
            }
        }

        /// With rate 0 every wait is zero.
        #[test]
        fn unlimited_never_waits(
            burst in any::<u64>(),
            ops in proptest::collection::vec((any::<u32>(), any::<u64>()), 0..100),
        ) {
            let mut bucket = TokenBucket::new(0, burst);
            let mut now = Duration::ZERO;
            for (advance, bytes) in ops {
                now += Duration::from_nanos(u64::from(advance));
                prop_assert_eq!(bucket.take(now, bytes), Duration::ZERO);
            }
        }
    }

    #[tokio::test]
    async fn unlimited_limiter_returns_at_once() {
        let limiter = RateLimiter::unlimited();
        assert_eq!(limiter.rate(), 0);
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            limiter.acquire(u64::MAX).await;
        }
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// On the real clock, scaled down: 64 × 1 MiB at 512 MiB/s with a 64 KiB burst,
    /// shared by 8 concurrent tasks, take ~125 ms.
    #[tokio::test]
    async fn concurrent_acquisitions_share_the_rate() {
        let limiter = RateLimiter::new(512 * MIB, 64 * KIB);
        assert_eq!(limiter.rate(), 512 * MIB);
        let start = std::time::Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    for _ in 0..8 {
                        limiter.acquire(MIB).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = secs_f64(start.elapsed());
        let expected = (64 * MIB - 64 * KIB) as f64 / (512 * MIB) as f64;
        assert!(elapsed >= expected * 0.99, "{elapsed} s < {expected} s");
        assert!(elapsed < expected + 2.0, "{elapsed} s");
    }

    #[test]
    fn upload_slots_refuse_when_full_and_free_on_drop() {
        let slots = UploadSlots::new(2);
        assert_eq!(slots.max(), 2);
        let a = slots.try_acquire().expect("first slot");
        let b = slots.clone().try_acquire().expect("second slot");
        assert_eq!(slots.in_use(), 2);
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert_eq!(slots.in_use(), 1);
        let c = slots.try_acquire().expect("freed slot");
        assert!(slots.try_acquire().is_none());
        drop((b, c));
        assert_eq!(slots.in_use(), 0);

        let none = UploadSlots::new(0);
        assert!(none.try_acquire().is_none());
        assert_eq!(none.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_four_mib_at_eight_mib_per_second_take_eight_virtual_seconds() {
        let limiter = RateLimiter::new(8 * MIB, 64 * KIB);
        let start = tokio::time::Instant::now();
        for _ in 0..64 {
            limiter.acquire(MIB).await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(7_990), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(8_010), "{elapsed:?}");
    }
}
