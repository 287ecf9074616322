//! Which cache entries to remove, decided without I/O ("sans-IO"): entries, policy, the
//! current time and the limits go in, victims come out. [`super::PluginCache::evict`]
//! feeds it the index, the pins and the unindexed files of `downloaded/`, then applies
//! the answer to disk and index.
//!
//! Rules:
//! - builtin and pinned candidates are never victims;
//! - first TTL: every other candidate whose last use is more than `ttl` ago;
//! - then size: once the distinct content bytes of the remaining non-builtin candidates
//!   exceed the high mark, the next candidate in policy order goes while they exceed the
//!   low mark (both are `max_size` unless `cache.high_watermark` / `low_watermark` say
//!   otherwise). Candidates whose content is also referenced by a pinned candidate are
//!   skipped (removing them frees nothing). If only pinned content is left the total may
//!   stay above the marks.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use arcade_p2p::ContentId;

use super::{EvictReason, EvictionPolicy};

/// One cache entry as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Content the entry points at; entries may share content.
    pub sha256: ContentId,
    /// Content size in bytes.
    pub size: u64,
    /// When the entry was inserted (ms).
    pub inserted_ms: u64,
    /// When the entry was last used (ms).
    pub last_used_ms: u64,
    /// How often it was used.
    pub use_count: u64,
    /// Builtin: its bytes live in `builtin/`, never counted, never removed.
    pub builtin: bool,
    /// Pinned by a running job (or the entry a publish just stored).
    pub pinned: bool,
}

/// Limits of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Size eviction starts when the distinct downloaded bytes exceed this…
    pub high: u64,
    /// …and removes candidates until they are at most this (≤ `high`).
    pub low: u64,
    /// Entries unused for longer than this (ms) are removed.
    pub ttl_ms: Option<u64>,
}

/// A candidate to remove: its index in the input and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Victim {
    /// Index into the candidate slice.
    pub index: usize,
    /// TTL or size pressure.
    pub reason: EvictReason,
}

/// Bytes of distinct content referenced by non-builtin candidates.
#[cfg(test)]
pub(crate) fn downloaded_bytes<'a>(candidates: impl IntoIterator<Item = &'a Candidate>) -> u64 {
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter(|c| !c.builtin && seen.insert(c.sha256))
        .fold(0u64, |sum, c| sum.saturating_add(c.size))
}

/// Orders two candidates for eviction under `policy`: `Less` goes first.
/// Lru: oldest last use; Lfu: fewest uses, then oldest last use; Fifo: oldest insert.
pub(crate) fn policy_order(policy: EvictionPolicy, a: &Candidate, b: &Candidate) -> Ordering {
    match policy {
        EvictionPolicy::Lru => {
            (a.last_used_ms, a.inserted_ms).cmp(&(b.last_used_ms, b.inserted_ms))
        }
        EvictionPolicy::Lfu => (a.use_count, a.last_used_ms, a.inserted_ms).cmp(&(
            b.use_count,
            b.last_used_ms,
            b.inserted_ms,
        )),
        EvictionPolicy::Fifo => {
            (a.inserted_ms, a.last_used_ms).cmp(&(b.inserted_ms, b.last_used_ms))
        }
    }
}

/// Picks the candidates to remove: TTL victims first, then size victims in policy order
/// (ties broken by input order). Never picks builtin or pinned candidates.
pub(crate) fn select_victims(
    candidates: &[Candidate],
    policy: EvictionPolicy,
    now_ms: u64,
    limits: Limits,
) -> Vec<Victim> {
    let evictable = |c: &Candidate| !c.builtin && !c.pinned;
    let mut removed = vec![false; candidates.len()];
    let mut victims = Vec::new();

    if let Some(ttl) = limits.ttl_ms {
        for (index, c) in candidates.iter().enumerate() {
            if evictable(c) && now_ms.saturating_sub(c.last_used_ms) > ttl {
                removed[index] = true;
                victims.push(Victim {
                    index,
                    reason: EvictReason::Ttl,
                });
            }
        }
    }

    // Content still referenced after TTL: size (first seen) and reference count.
    let mut refs: HashMap<ContentId, (u64, usize)> = HashMap::new();
    let mut pinned_content = HashSet::new();
    for (index, c) in candidates.iter().enumerate() {
        if removed[index] || c.builtin {
            continue;
        }
        refs.entry(c.sha256).or_insert((c.size, 0)).1 += 1;
        if c.pinned {
            pinned_content.insert(c.sha256);
        }
    }
    let mut total = refs
        .values()
        .fold(0u64, |sum, (size, _)| sum.saturating_add(*size));
    if total <= limits.high {
        return victims;
    }

    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            let c = &candidates[i];
            !removed[i] && evictable(c) && !pinned_content.contains(&c.sha256)
        })
        .collect();
    order.sort_by(|&a, &b| policy_order(policy, &candidates[a], &candidates[b]).then(a.cmp(&b)));
    for index in order {
        if total <= limits.low {
            break;
        }
        victims.push(Victim {
            index,
            reason: EvictReason::Size,
        });
        let r = refs
            .get_mut(&candidates[index].sha256)
            .expect("every remaining candidate is counted");
        r.1 -= 1;
        if r.1 == 0 {
            total -= r.0;
        }
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(k: u8, size: u64, inserted: u64, last: u64, count: u64) -> Candidate {
        Candidate {
            sha256: ContentId::from_bytes([k; 32]),
            size,
            inserted_ms: inserted,
            last_used_ms: last,
            use_count: count,
            builtin: false,
            pinned: false,
        }
    }

    fn limits(max_size: u64) -> Limits {
        Limits {
            high: max_size,
            low: max_size,
            ttl_ms: None,
        }
    }

    fn indices(v: &[Victim]) -> Vec<usize> {
        v.iter().map(|v| v.index).collect()
    }

    #[test]
    fn each_policy_picks_its_own_victim() {
        // a: oldest insert; b: fewest uses; c: oldest last use.
        let cands = [
            cand(1, 10, 1, 21, 3),
            cand(2, 10, 15, 15, 1),
            cand(3, 10, 3, 12, 3),
        ];
        let pick = |p| indices(&select_victims(&cands, p, 100, limits(20)));
        assert_eq!(pick(EvictionPolicy::Fifo), vec![0]);
        assert_eq!(pick(EvictionPolicy::Lfu), vec![1]);
        assert_eq!(pick(EvictionPolicy::Lru), vec![2]);
        // Within the limit nothing goes.
        assert!(select_victims(&cands, EvictionPolicy::Lru, 100, limits(30)).is_empty());
    }

    #[test]
    fn over_the_high_mark_eviction_goes_down_to_the_low_mark() {
        // 40 bytes in four candidates, oldest use first.
        let cands = [
            cand(1, 10, 0, 1, 1),
            cand(2, 10, 0, 2, 1),
            cand(3, 10, 0, 3, 1),
            cand(4, 10, 0, 4, 1),
        ];
        let marks = |high, low| Limits {
            high,
            low,
            ttl_ms: None,
        };
        // At or under the high mark nothing goes, however low the low mark.
        assert!(select_victims(&cands, EvictionPolicy::Lru, 10, marks(40, 5)).is_empty());
        // Over it: down to the low mark (40 → 20), not just under the high one.
        let v = select_victims(&cands, EvictionPolicy::Lru, 10, marks(35, 20));
        assert_eq!(indices(&v), vec![0, 1]);
        // Pinned content is never a victim, even when the low mark stays out of reach.
        let mut pinned = cands.clone();
        pinned[0].pinned = true;
        pinned[1].pinned = true;
        let v = select_victims(&pinned, EvictionPolicy::Lru, 10, marks(35, 5));
        assert_eq!(indices(&v), vec![2, 3]);
    }

    #[test]
    fn lfu_ties_go_to_the_oldest_last_use() {
        let cands = [cand(1, 10, 1, 50, 2), cand(2, 10, 2, 40, 2)];
        let v = select_victims(&cands, EvictionPolicy::Lfu, 100, limits(10));
        assert_eq!(indices(&v), vec![1]);
    }

    #[test]
    fn ttl_victims_then_size() {
        let mut cands = vec![
            cand(1, 10, 0, 0, 1),
            cand(2, 10, 0, 90, 1),
            cand(3, 10, 0, 95, 1),
        ];
        cands[0].pinned = true;
        let v = select_victims(
            &cands,
            EvictionPolicy::Lru,
            100,
            Limits {
                high: 15,
                low: 15,
                ttl_ms: Some(8),
            },
        );
        // 0 is pinned (survives TTL), 1 is past TTL, then 0+2 = 20 > 15: 2 goes, 0 is pinned.
        assert_eq!(
            v,
            vec![
                Victim {
                    index: 1,
                    reason: EvictReason::Ttl
                },
                Victim {
                    index: 2,
                    reason: EvictReason::Size
                },
            ]
        );
    }

    #[test]
    fn shared_content_is_counted_once_and_freed_with_its_last_entry() {
        let cands = [
            cand(1, 10, 1, 1, 1),
            cand(1, 10, 2, 2, 1),
            cand(2, 10, 3, 3, 1),
        ];
        assert_eq!(downloaded_bytes(&cands), 20);
        // Removing entry 0 frees nothing; entry 1 frees content 1.
        let v = select_victims(&cands, EvictionPolicy::Lru, 10, limits(10));
        assert_eq!(indices(&v), vec![0, 1]);
    }

    #[test]
    fn content_held_by_a_pin_is_not_evicted_through_another_entry() {
        let mut cands = vec![
            cand(1, 10, 1, 1, 1),
            cand(1, 10, 2, 2, 1),
            cand(2, 10, 3, 3, 1),
        ];
        cands[1].pinned = true;
        let v = select_victims(&cands, EvictionPolicy::Lru, 10, limits(10));
        assert_eq!(indices(&v), vec![2]);
    }

    fn arb_policy() -> impl Strategy<Value = EvictionPolicy> {
        prop_oneof![
            Just(EvictionPolicy::Lru),
            Just(EvictionPolicy::Lfu),
            Just(EvictionPolicy::Fifo)
        ]
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Candidate>, EvictionPolicy, u64, Limits)> {
        let sizes = proptest::collection::vec(0u64..2_000, 6);
        let raw = proptest::collection::vec(
            (
                0u8..6,
                0u64..1_000,
                0u64..1_000,
                0u64..8,
                prop::bool::weighted(0.15),
                prop::bool::weighted(0.2),
            ),
            0..24,
        );
        (
            sizes,
            raw,
            arb_policy(),
            1_000u64..1_500,
            0u64..8_000,
            proptest::option::of(0u64..1_200),
        )
            .prop_map(|(sizes, raw, policy, now, max_size, ttl_ms)| {
                let cands = raw
                    .into_iter()
                    .map(|(k, inserted, last, count, builtin, pinned)| Candidate {
                        sha256: ContentId::from_bytes([k; 32]),
                        size: sizes[k as usize],
                        inserted_ms: inserted,
                        last_used_ms: last,
                        use_count: count,
                        builtin,
                        pinned,
                    })
                    .collect();
                (
                    cands,
                    policy,
                    now,
                    Limits {
                        high: max_size,
                        low: max_size,
                        ttl_ms,
                    },
                )
            })
    }

    proptest! {
        #[test]
        fn victims_respect_pins_limits_and_policy((cands, policy, now, limits) in arb_case()) {
            let victims = select_victims(&cands, policy, now, limits);
            let mut removed = vec![false; cands.len()];
            for v in &victims {
                let c = &cands[v.index];
                prop_assert!(!c.pinned && !c.builtin, "picked pinned or builtin {:?}", c);
                prop_assert!(!removed[v.index], "picked twice");
                removed[v.index] = true;
            }

            // TTL victims are exactly the expired unpinned, non-builtin candidates.
            for (i, c) in cands.iter().enumerate() {
                let expired = limits.ttl_ms.is_some_and(|t| now.saturating_sub(c.last_used_ms) > t);
                let is_ttl = victims.iter().any(|v| v.index == i && v.reason == EvictReason::Ttl);
                prop_assert_eq!(is_ttl, expired && !c.pinned && !c.builtin);
            }

            // Size: within the limit whenever unpinned bytes suffice, else only pinned left.
            let left = || cands.iter().enumerate().filter(|(i, _)| !removed[*i]).map(|(_, c)| c);
            let after = downloaded_bytes(left());
            let pinned_bytes = downloaded_bytes(cands.iter().filter(|c| c.pinned));
            if pinned_bytes <= limits.low {
                prop_assert!(after <= limits.low, "{} > {}", after, limits.low);
            } else {
                prop_assert_eq!(after, pinned_bytes);
            }

            // Size victims are needed: before the last one the total was above the limit.
            let size_victims: Vec<usize> = victims
                .iter()
                .filter(|v| v.reason == EvictReason::Size)
                .map(|v| v.index)
                .collect();
            if let Some(&last) = size_victims.last() {
                let before = downloaded_bytes(
                    cands.iter().enumerate().filter(|(i, _)| !removed[*i] || *i == last).map(|(_, c)| c),
                );
                prop_assert!(before > limits.low);
            }

            // Policy order: size victims come in order, and before every eligible survivor.
            for pair in size_victims.windows(2) {
                prop_assert_ne!(
                    policy_order(policy, &cands[pair[0]], &cands[pair[1]]),
                    Ordering::Greater
                );
            }
            let pinned_content: HashSet<ContentId> = left()
                .filter(|c| c.pinned && !c.builtin)
                .map(|c| c.sha256)
                .collect();
            for &v in &size_victims {
                for (i, s) in cands.iter().enumerate() {
                    if removed[i] || s.pinned || s.builtin || pinned_content.contains(&s.sha256) {
                        continue;
                    }
                    prop_assert_ne!(policy_order(policy, &cands[v], s), Ordering::Greater);
                }
            }
        }
    }
}
