//! Tests of the scheduler: unit tests of each rule, and property tests that drive it
//! through a small simulated world of honest and hostile peers (no sockets, no sleeps).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

type Peer = u32;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bits(len: u32, set: impl IntoIterator<Item = u32>) -> Bitfield {
    let mut b = Bitfield::new(len);
    for i in set {
        b.set(i);
    }
    b
}

fn joined(peer: Peer, have: Bitfield) -> Event<Peer> {
    Event::PeerJoined { peer, have }
}

fn arrived(source: Source<Peer>, chunk: u32) -> Event<Peer> {
    Event::ChunkArrived { source, chunk }
}

fn request(source: Source<Peer>, chunk: u32) -> Action<Peer> {
    Action::Request { source, chunk }
}

fn cancel(source: Source<Peer>, chunk: u32) -> Action<Peer> {
    Action::Cancel { source, chunk }
}

/// The chunks of the requests among `actions`, in order.
fn requested(actions: &[Action<Peer>]) -> Vec<(Source<Peer>, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { source, chunk } => Some((source.clone(), *chunk)),
            _ => None,
        })
        .collect()
}

fn no_server() -> SchedulerConfig {
    SchedulerConfig {
        server_allowed: false,
        ..SchedulerConfig::default()
    }
}

use Source::{Peer as P, Server};

// ----- unit tests -----------------------------------------------------------------------

#[test]
fn default_config_is_valid_and_zero_limits_are_rejected() {
    assert_eq!(SchedulerConfig::default().validate(), Ok(()));
    let zero_peer = SchedulerConfig {
        max_inflight_per_peer: 0,
        ..SchedulerConfig::default()
    };
    assert_eq!(
        zero_peer.validate(),
        Err(SchedulerConfigError::Zero {
            key: "max_inflight_per_peer"
        })
    );
    let zero_timeout = SchedulerConfig {
        request_timeout: Duration::ZERO,
        ..SchedulerConfig::default()
    };
    assert_eq!(
        zero_timeout.validate(),
        Err(SchedulerConfigError::ZeroTimeout)
    );
    // The scheduler itself raises zero limits to 1 rather than stalling.
    let s: Scheduler<Peer> = Scheduler::new(1, Bitfield::new(1), zero_peer, 0);
    assert_eq!(s.config().max_inflight_per_peer, 1);
}

#[test]
fn starting_full_emits_done_once_at_the_first_call() {
    let mut s: Scheduler<Peer> =
        Scheduler::new(3, Bitfield::full(3), SchedulerConfig::default(), 1);
    assert_eq!(s.handle(ms(0), Event::Tick), vec![Action::Done]);
    assert_eq!(s.handle(ms(1), joined(1, Bitfield::full(3))), vec![]);
    assert_eq!(s.handle(ms(2), Event::Tick), vec![]);
    assert!(s.is_done());

    let mut empty: Scheduler<Peer> =
        Scheduler::new(0, Bitfield::new(0), SchedulerConfig::default(), 1);
    assert_eq!(
        empty.handle(ms(5), joined(1, Bitfield::new(0))),
        vec![Action::Done]
    );
    assert_eq!(empty.handle(ms(6), Event::Tick), vec![]);
}

#[test]
fn asks_only_for_announced_chunks() {
    let mut s = Scheduler::new(3, Bitfield::new(3), no_server(), 7);
    assert_eq!(
        s.handle(ms(0), joined(1, bits(3, [1]))),
        vec![request(P(1), 1)]
    );
    // A bitfield longer than the content: the stray bit is ignored.
    assert_eq!(s.handle(ms(1), joined(2, bits(9, [8]))), vec![]);
    assert_eq!(
        s.handle(ms(2), Event::Have { peer: 1, chunk: 2 }),
        vec![request(P(1), 2)]
    );
    // Out of range or from an unknown peer: ignored.
    assert_eq!(s.handle(ms(3), Event::Have { peer: 1, chunk: 3 }), vec![]);
    assert_eq!(s.handle(ms(4), Event::Have { peer: 9, chunk: 0 }), vec![]);
    assert_eq!(s.inflight(), 2);
}

#[test]
fn rarest_chunk_first_random_among_equals() {
    let cfg = SchedulerConfig {
        max_inflight_total: 1,
        ..no_server()
    };
    let mut orders = BTreeSet::new();
    let mut chunk1_from = BTreeSet::new();
    for seed in 0..64 {
        let mut s = Scheduler::new(5, Bitfield::new(5), cfg.clone(), seed);
        // The single slot goes to chunk 4 (the only one known); the others wait.
        assert_eq!(
            s.handle(ms(0), joined(9, bits(5, [4]))),
            vec![request(P(9), 4)]
        );
        // Chunk 0 has one holder, chunk 1 two, chunks 2 and 3 three.
        assert_eq!(s.handle(ms(1), joined(0, bits(5, [0, 1, 2, 3]))), vec![]);
        assert_eq!(s.handle(ms(2), joined(1, bits(5, [1, 2, 3]))), vec![]);
        assert_eq!(s.handle(ms(3), joined(2, bits(5, [2, 3]))), vec![]);
        let mut order = vec![4];
        let mut last = (P(9), 4);
        for t in 10..14 {
            let next = requested(&s.handle(ms(t), arrived(last.0.clone(), last.1)));
            assert_eq!(next.len(), 1, "one free slot, one request");
            last = next[0].clone();
            order.push(last.1);
            if last.1 == 1 {
                chunk1_from.insert(last.0.clone());
            }
        }
        assert_eq!(&order[..3], &[4, 0, 1], "seed {seed}: rarest first");
        orders.insert(order);
        assert_eq!(
            s.handle(ms(20), arrived(last.0, last.1)),
            vec![Action::Done]
        );
    }
    let expected: BTreeSet<Vec<u32>> = [vec![4, 0, 1, 2, 3], vec![4, 0, 1, 3, 2]].into();
    assert_eq!(
        orders, expected,
        "ties between equally rare chunks are broken at random"
    );
    let holders: BTreeSet<Source<Peer>> = [P(0), P(1)].into();
    assert_eq!(
        chunk1_from, holders,
        "ties between equally loaded holders are broken at random"
    );
}

#[test]
fn prefers_the_least_loaded_holder() {
    let cfg = SchedulerConfig {
        max_inflight_total: 2,
        ..no_server()
    };
    for seed in 0..16 {
        let mut s = Scheduler::new(8, Bitfield::new(8), cfg.clone(), seed);
        let first = requested(&s.handle(ms(0), joined(1, Bitfield::full(8))));
        assert_eq!(first.len(), 2);
        assert_eq!(s.handle(ms(1), joined(2, Bitfield::full(8))), vec![]);
        // Peer 1 has one request left, peer 2 none: the freed slot goes to peer 2.
        let next = requested(&s.handle(ms(2), arrived(first[0].0.clone(), first[0].1)));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0, P(2), "seed {seed}");
    }
}

#[test]
fn busy_peers_are_left_alone_for_a_while_but_never_struck() {
    let mut s = Scheduler::new(8, Bitfield::new(8), no_server(), 5);
    let first = requested(&s.handle(ms(0), joined(1, Bitfield::full(8))));
    assert_eq!(first.len(), 4, "max_inflight_per_peer");
    let busy = |s: &mut Scheduler<u32>, t: u64, asked: Vec<(Source<u32>, u32)>| {
        for (source, chunk) in asked {
            let Source::Peer(peer) = source else {
                panic!("no server here")
            };
            let out = s.handle(
                ms(t),
                Event::PeerBusy {
                    peer,
                    chunk,
                    retry_after: ms(100),
                },
            );
            assert!(requested(&out).is_empty(), "not asked while busy");
            assert!(!out.iter().any(|a| matches!(a, Action::Ban { .. })));
        }
    };
    // Busy answers, many more than max_strikes: no ban, no re-ask during the pause, and
    // the pause doubles with each busy round up to 2^BUSY_MAX_DOUBLINGS × retry_after.
    let (mut t, mut pause) = (1, 100);
    let mut asked = first;
    for round in 0..6 {
        assert_eq!(asked.len(), 4, "round {round}: asked again after the pause");
        busy(&mut s, t, asked);
        assert!(
            requested(&s.handle(ms(t + pause - 1), Event::Tick)).is_empty(),
            "round {round}: asked before its {pause} ms pause ended"
        );
        t += pause;
        pause = (pause * 2).min(100 << BUSY_MAX_DOUBLINGS);
        asked = requested(&s.handle(ms(t), Event::Tick));
    }
    assert!(!s.is_banned(&1));
    assert_eq!(s.stats().peer_busy, 24);
    assert_eq!(s.stats().bans, 0);
    // A chunk from the peer ends the streak: the next busy pause is retry_after again.
    let (got, rest) = asked.split_first().expect("asked after the last pause");
    s.handle(
        ms(t),
        Event::ChunkArrived {
            source: got.0.clone(),
            chunk: got.1,
        },
    );
    busy(&mut s, t, rest.to_vec());
    assert!(requested(&s.handle(ms(t + 99), Event::Tick)).is_empty());
    let again = requested(&s.handle(ms(t + 100), Event::Tick));
    assert!(!again.is_empty(), "asked again after retry_after");
    // Other peers are still used while one is busy.
    busy(&mut s, t + 100, again);
    let more = requested(&s.handle(ms(t + 150), joined(2, Bitfield::full(8))));
    assert!(!more.is_empty() && more.iter().all(|(src, _)| *src == P(2)));
}

#[test]
fn busy_answers_narrow_the_window_once_per_round_and_chunks_widen_it() {
    // A long hedge delay: no request here is old enough to be presumed stalled.
    let config = SchedulerConfig {
        hedge_after: Duration::from_secs(60),
        ..no_server()
    };
    let mut s = Scheduler::new(64, Bitfield::new(64), config, 9);
    let peers = (1..=10).map(|p| joined(p, Bitfield::full(64)));
    let mut asked = requested(&s.handle_all(ms(0), peers));
    let mut t = 0;
    let mut sizes = Vec::new();
    for _ in 0..7 {
        sizes.push(s.inflight());
        assert_eq!(asked.len(), s.inflight());
        // Every outstanding request comes back busy: one cut per round, and the places
        // below the new window go to peers not paused yet.
        t += 10;
        for (source, chunk) in std::mem::take(&mut asked) {
            let Source::Peer(peer) = source else {
                panic!("no server here")
            };
            let retry_after = ms(100);
            let event = Event::PeerBusy {
                peer,
                chunk,
                retry_after,
            };
            let more = requested(&s.handle(ms(t), event));
            assert!(more.is_empty() || s.inflight() <= s.peer_window());
            asked.extend(more);
        }
        // After every peer's pause, the round is topped up to the window.
        t += 2000;
        asked.extend(requested(&s.handle(ms(t), Event::Tick)));
    }
    assert_eq!(
        sizes,
        [32, 24, 18, 13, 9, 8, 8],
        "cut by a quarter, floor 8"
    );
    assert_eq!(s.peer_window(), 8);
    // Each chunk from a peer widens it by one, up to max_inflight_total.
    for (source, chunk) in asked {
        s.handle(ms(t + 5), arrived(source, chunk));
    }
    assert_eq!(s.peer_window(), 16);
    assert_eq!(s.stats().bans, 0);
}

#[test]
fn requests_stalled_for_half_the_hedge_delay_leave_the_window() {
    let mut s = Scheduler::new(64, Bitfield::new(64), no_server(), 11);
    let peers = (1..=10).map(|p| joined(p, Bitfield::full(64)));
    let asked = requested(&s.handle_all(ms(0), peers));
    assert_eq!(asked.len(), 32);
    let (Source::Peer(peer), chunk) = asked[0].clone() else {
        panic!("no server here")
    };
    let busy = Event::PeerBusy {
        peer,
        chunk,
        retry_after: ms(100),
    };
    assert!(requested(&s.handle(ms(10), busy)).is_empty());
    assert_eq!(s.peer_window(), 24);
    // 31 requests outstanding in a window of 24: nothing new while they are young...
    assert!(requested(&s.handle(ms(1499), Event::Tick)).is_empty());
    // ...and once they are older than hedge_after / 2 (3 s / 2) they are presumed
    // stalled: only max_inflight_total (32) limits new requests.
    assert_eq!(requested(&s.handle(ms(1500), Event::Tick)).len(), 1);
}

#[test]
fn the_server_waits_while_peer_requests_fill_the_window() {
    let config = SchedulerConfig {
        max_inflight_total: 8,
        server_max_inflight: 2,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(16, Bitfield::new(16), config, 4);
    let batch = [joined(1, bits(16, 0..8)), joined(2, bits(16, 0..8))];
    let first = requested(&s.handle_all(ms(0), batch));
    assert_eq!(first.len(), 8);
    // Chunks 8..16 are starved past the fallback delay, but the window is full of peer
    // requests: the server is not asked.
    assert!(requested(&s.handle(ms(600), Event::Tick)).is_empty());
    // A chunk arrives and no peer holds anything unrequested: the free place goes to
    // the server.
    let (source, chunk) = first[0].clone();
    let next = requested(&s.handle(ms(700), arrived(source, chunk)));
    assert_eq!(next.len(), 1);
    assert!(next.iter().all(|(src, c)| *src == Server && *c >= 8));
}

#[test]
fn a_redirect_also_paces_the_other_server_requests() {
    let mut s = Scheduler::new(10, Bitfield::new(10), SchedulerConfig::default(), 5);
    assert!(requested(&s.handle(ms(0), Event::Tick)).is_empty());
    let to_server = requested(&s.handle(ms(500), Event::Tick));
    assert_eq!(to_server.len(), 4, "server_max_inflight");
    let deferred = to_server[0].1;
    let event = Event::ServerDeferred {
        chunk: deferred,
        retry_after: ms(300),
    };
    // Half the redirect's wait before any server request, a full wait for its chunk.
    assert!(requested(&s.handle(ms(510), event)).is_empty());
    assert!(requested(&s.handle(ms(659), Event::Tick)).is_empty());
    let next = requested(&s.handle(ms(660), Event::Tick));
    assert_eq!(next.len(), 1);
    assert!(next[0].0 == Server && next[0].1 != deferred);
}

#[test]
fn a_batch_of_news_is_scheduled_once_after_the_last_event() {
    // Peer 1 holds everything, peer 2 the first half. Fed together, the second half is
    // the rarer and goes to peer 1; the first half to peer 2.
    let mut s = Scheduler::new(8, Bitfield::new(8), no_server(), 6);
    let batch = [joined(1, Bitfield::full(8)), joined(2, bits(8, 0..4))];
    let asked = requested(&s.handle_all(ms(0), batch));
    assert_eq!(asked.len(), 8);
    for (source, chunk) in asked {
        match source {
            P(1) => assert!(chunk >= 4, "peer 1 asked for {chunk}"),
            P(2) => assert!(chunk < 4, "peer 2 asked for {chunk}"),
            other => panic!("unexpected source {other:?}"),
        }
    }
    // Events after the one that completes the content are ignored.
    let mut one = Scheduler::new(1, Bitfield::new(1), no_server(), 7);
    one.handle(ms(0), joined(1, Bitfield::full(1)));
    let out = one.handle_all(ms(1), [arrived(P(1), 0), joined(2, Bitfield::full(1))]);
    assert_eq!(out, vec![Action::Done]);
}

#[test]
fn a_peer_that_stalls_until_the_hedge_wins_is_struck_and_banned() {
    let config = SchedulerConfig {
        hedge_after: ms(1000),
        endgame_chunks: 0,
        ..no_server()
    };
    let mut s = Scheduler::new(8, Bitfield::new(8), config, 9);
    let stalled = requested(&s.handle(ms(0), joined(1, Bitfield::full(8))));
    assert_eq!(stalled.len(), 4);
    let quick = requested(&s.handle(ms(1), joined(2, Bitfield::full(8))));
    assert_eq!(quick.len(), 4);
    // Peer 2 answers at once: losing nothing, no strike for anyone.
    for (source, chunk) in quick {
        s.handle(ms(500), arrived(source, chunk));
    }
    assert_eq!(s.stats().slow_strikes, 0);
    // Peer 1 never answers: at hedge_after its chunks are duplicated at peer 2, which
    // wins every race; each loss after hedge_after is a strike, the third a ban.
    let hedged = requested(&s.handle(ms(1000), Event::Tick));
    assert_eq!(hedged.len(), 4);
    assert!(hedged.iter().all(|(src, _)| *src == P(2)));
    let mut banned = Vec::new();
    for (source, chunk) in hedged {
        for a in s.handle(ms(1100), arrived(source, chunk)) {
            if let Action::Ban { peer, .. } = a {
                banned.push(peer);
            }
        }
    }
    assert_eq!(banned, vec![1], "the staller, once");
    assert_eq!(
        s.stats().slow_strikes,
        3,
        "the fourth arrival completed the content"
    );
    assert!(s.is_done());
}

#[test]
fn server_waits_for_the_fallback_delay_and_gets_only_chunks_no_peer_has() {
    let mut s = Scheduler::new(10, Bitfield::new(10), SchedulerConfig::default(), 3);
    let to_peer = requested(&s.handle(ms(0), joined(1, bits(10, 0..5))));
    assert_eq!(to_peer.len(), 4);
    assert!(to_peer.iter().all(|(src, c)| *src == P(1) && *c < 5));
    for t in (100..500).step_by(100) {
        assert_eq!(s.handle(ms(t), Event::Tick), vec![], "at {t} ms");
    }
    let to_server = requested(&s.handle(ms(500), Event::Tick));
    assert_eq!(to_server.len(), 4, "server_max_inflight");
    assert!(to_server.iter().all(|(src, c)| *src == Server && *c >= 5));
}

#[test]
fn one_complete_honest_peer_means_no_server_requests() {
    let world = World {
        chunks: 100,
        have: Bitfield::new(100),
        peers: vec![SimPeer::honest(Bitfield::full(100), 0, 50)],
        server_delay_ms: 20,
        server_busy: 0,
        retry_after_ms: 0,
        config: SchedulerConfig::default(),
        seed: 11,
    };
    let out = world.run();
    assert!(out.done_at.is_some());
    assert_eq!(out.stats.requests_to_server, 0);
    assert_eq!(out.stats.chunks_from_peers, 100);
}

#[test]
fn server_gets_exactly_the_chunks_no_peer_has() {
    let world = World {
        chunks: 10,
        have: Bitfield::new(10),
        peers: vec![SimPeer::honest(bits(10, 0..5), 0, 50)],
        server_delay_ms: 50,
        server_busy: 0,
        retry_after_ms: 0,
        config: SchedulerConfig::default(),
        seed: 5,
    };
    let out = world.run();
    assert!(out.done_at.is_some());
    let chunks: BTreeSet<u32> = out.server_requests.iter().map(|&(_, c)| c).collect();
    assert_eq!(chunks, (5..10).collect());
    assert_eq!(out.server_requests.len(), 5, "one request per chunk");
    assert!(out.server_requests.iter().all(|&(t, _)| t >= ms(500)));
    assert_eq!(out.stats.chunks_from_peers, 5);
    assert_eq!(out.stats.chunks_from_server, 5);
}

#[test]
fn endgame_duplicates_to_other_holders_and_cancels_the_losers() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 2,
        endgame_budget_percent: 100,
        ..no_server()
    };
    let mut s = Scheduler::new(2, Bitfield::new(2), cfg, 9);
    let mut first = requested(&s.handle(ms(0), joined(1, Bitfield::full(2))));
    first.sort();
    assert_eq!(first, vec![(P(1), 0), (P(1), 1)]);
    // Every missing chunk is in flight and few are missing: duplicate both to peer 2.
    assert_eq!(
        s.handle(ms(10), joined(2, Bitfield::full(2))),
        vec![request(P(2), 0), request(P(2), 1)]
    );
    assert_eq!(s.inflight(), 4);
    assert_eq!(s.handle(ms(20), arrived(P(1), 0)), vec![cancel(P(2), 0)]);
    assert_eq!(
        s.handle(ms(30), arrived(P(2), 1)),
        vec![cancel(P(1), 1), Action::Done]
    );
    // The cancelled losers' late answers change nothing.
    assert_eq!(s.handle(ms(40), arrived(P(1), 1)), vec![]);
    let st = s.stats();
    assert_eq!(
        (
            st.duplicates,
            st.cancels,
            st.chunks_from_peers,
            s.inflight()
        ),
        (2, 2, 2, 0)
    );
}

#[test]
fn endgame_goes_to_the_server_only_after_the_fallback_delay() {
    let mut s = Scheduler::new(1, Bitfield::new(1), SchedulerConfig::default(), 2);
    assert_eq!(
        s.handle(ms(0), joined(1, bits(1, [0]))),
        vec![request(P(1), 0)]
    );
    assert_eq!(s.handle(ms(499), Event::Tick), vec![]);
    assert_eq!(s.handle(ms(500), Event::Tick), vec![request(Server, 0)]);
    assert_eq!(
        s.handle(ms(600), arrived(Server, 0)),
        vec![cancel(P(1), 0), Action::Done]
    );
    assert_eq!(s.stats().duplicates, 1);
    assert_eq!(s.stats().chunks_from_server, 1);
}

#[test]
fn hedges_a_stalled_request_once_at_another_holder() {
    let cfg = SchedulerConfig {
        endgame_chunks: 0,
        ..no_server()
    };
    let mut s = Scheduler::new(1, Bitfield::new(1), cfg, 4);
    assert_eq!(
        s.handle(ms(0), joined(1, bits(1, [0]))),
        vec![request(P(1), 0)]
    );
    assert_eq!(s.handle(ms(1000), joined(2, bits(1, [0]))), vec![]);
    assert_eq!(s.handle(ms(2999), Event::Tick), vec![]);
    assert_eq!(s.handle(ms(3000), Event::Tick), vec![request(P(2), 0)]);
    assert_eq!(
        s.handle(ms(3100), Event::Tick),
        vec![],
        "one duplicate only"
    );
    assert_eq!(
        s.handle(ms(4000), arrived(P(2), 0)),
        vec![cancel(P(1), 0), Action::Done]
    );
    assert_eq!(s.stats().duplicates, 1);
}

#[test]
fn a_peer_that_keeps_delivering_is_hedged_only_past_the_age_cap() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 2,
        hedge_after: ms(1000),
        endgame_chunks: 0,
        ..no_server()
    };
    let mut s = Scheduler::new(40, Bitfield::new(40), cfg, 5);
    let first = requested(&s.handle(ms(0), joined(1, Bitfield::full(40))));
    assert_eq!(first.len(), 2);
    let (held, mut current) = (first[1].1, first[0].1);
    // Only peer 2 could take a hedge, and only of the chunk peer 1 sits on.
    assert_eq!(s.handle(ms(10), joined(2, bits(40, [held]))), vec![]);
    // Peer 1 delivers a chunk every 100 ms (and is asked for the next one) while it
    // sits on `held`: it is progressing, so `held` is not hedged…
    for k in 1..=29 {
        let next = requested(&s.handle(ms(100 * k), arrived(P(1), current)));
        assert_eq!(next.len(), 1, "one new request at {} ms", 100 * k);
        assert_eq!(next[0].0, P(1));
        current = next[0].1;
    }
    assert_eq!(s.handle(ms(2999), Event::Tick), vec![]);
    // …until it is STALL_AGE_CAP hedge delays old.
    assert_eq!(s.handle(ms(3000), Event::Tick), vec![request(P(2), held)]);
    assert_eq!(s.stats().duplicates, 1);
}

/// Three chunks all asked of peer 1 at 0 ms (hedge_after 1 s, no endgame, no server);
/// peer 2, holding all, joins at 10 ms with nothing to do. Returns the requests.
fn three_queued_at_one_peer() -> (Scheduler<Peer>, Vec<(Source<Peer>, u32)>) {
    let cfg = SchedulerConfig {
        hedge_after: ms(1000),
        endgame_chunks: 0,
        ..no_server()
    };
    let mut s = Scheduler::new(3, Bitfield::new(3), cfg, 6);
    let queued = requested(&s.handle(ms(0), joined(1, Bitfield::full(3))));
    assert_eq!(queued.len(), 3);
    assert_eq!(s.handle(ms(10), joined(2, Bitfield::full(3))), vec![]);
    (s, queued)
}

#[test]
fn a_silent_peer_is_hedged_one_hedge_delay_after_its_last_chunk() {
    let (mut s, queued) = three_queued_at_one_peer();
    assert_eq!(s.handle(ms(100), arrived(P(1), queued[0].1)), vec![]);
    assert_eq!(s.handle(ms(1099), Event::Tick), vec![]);
    let mut hedged = requested(&s.handle(ms(1100), Event::Tick));
    hedged.sort();
    let mut expect = vec![(P(2), queued[1].1), (P(2), queued[2].1)];
    expect.sort();
    assert_eq!(hedged, expect);
}

#[test]
fn when_every_chunk_is_slow_hedges_wait_for_twice_the_usual_time() {
    let (mut s, queued) = three_queued_at_one_peer();
    // Chunks take 2 s here (an agent short of CPU): a peer silent for 1 s is not
    // slower than the rest, and is hedged only after 4 s of silence.
    assert_eq!(
        requested(&s.handle(ms(2000), arrived(P(1), queued[0].1))),
        vec![]
    );
    assert_eq!(s.handle(ms(5999), Event::Tick), vec![]);
    assert_eq!(requested(&s.handle(ms(6000), Event::Tick)).len(), 2);
}

#[test]
fn the_endgame_duplicates_only_requests_overdue_for_their_peer() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 2,
        endgame_budget_percent: 100,
        ..no_server()
    };
    let mut s = Scheduler::new(3, Bitfield::new(3), cfg, 7);
    let first = requested(&s.handle(ms(0), joined(1, Bitfield::full(3))));
    assert_eq!(first.len(), 2);
    // Peer 1 delivers in 100 ms; the third chunk goes to it at once.
    let third = requested(&s.handle(ms(100), arrived(first[0].0.clone(), first[0].1)));
    assert_eq!(third.len(), 1);
    // Endgame (every missing chunk in flight, few missing), but neither request has
    // taken twice peer 1's usual 100 ms yet: no duplicate at the new peer.
    assert_eq!(s.handle(ms(110), joined(2, Bitfield::full(3))), vec![]);
    assert_eq!(s.handle(ms(199), Event::Tick), vec![]);
    assert_eq!(
        s.handle(ms(200), Event::Tick),
        vec![request(P(2), first[1].1)]
    );
    assert_eq!(s.handle(ms(299), Event::Tick), vec![]);
    assert_eq!(
        s.handle(ms(300), Event::Tick),
        vec![request(P(2), third[0].1)]
    );
    assert_eq!(s.stats().duplicates, 2);
}

#[test]
fn the_endgame_sends_at_most_its_budget_of_duplicates() {
    // 100 chunks at 3 %: three endgame duplicates in the whole fetch, however many
    // requests are overdue; a hedge of a stalled request still goes out after that.
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 8,
        endgame_chunks: 8,
        hedge_after: ms(10_000),
        request_timeout: ms(60_000),
        ..no_server()
    };
    let mut s = Scheduler::new(100, bits(100, 0..92), cfg, 11);
    let first = requested(&s.handle(ms(0), joined(1, Bitfield::full(100))));
    assert_eq!(first.len(), 8);
    // Peer 2 holds everything: every one of the 8 requests is overdue (no usual time
    // yet), but only 3 are duplicated.
    let dups = requested(&s.handle(ms(10), joined(2, Bitfield::full(100))));
    assert_eq!(dups.len(), 3);
    assert!(dups.iter().all(|(src, _)| *src == P(2)));
    assert_eq!(requested(&s.handle(ms(5_000), Event::Tick)), vec![]);
    let st = s.stats();
    assert_eq!((st.duplicates, st.endgame_duplicates), (3, 3));
    // The rest stay with peer 1 until they stall for the hedge delay: hedged then.
    let hedged = requested(&s.handle(ms(10_010), Event::Tick));
    assert_eq!(hedged.len(), 5);
    assert_eq!(s.stats().endgame_duplicates, 3);
}

#[test]
fn requests_at_a_slow_holder_are_rescued_beyond_the_endgame_budget() {
    // 10 chunks at 3 %: a budget of one duplicate.
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 3,
        endgame_chunks: 10,
        hedge_after: ms(60_000),
        request_timeout: ms(120_000),
        ..no_server()
    };
    let mut s = Scheduler::new(10, Bitfield::new(10), cfg, 5);
    let mut at_fast = requested(&s.handle(ms(0), joined(1, Bitfield::full(10))));
    let at_slow = requested(&s.handle(ms(0), joined(3, Bitfield::full(10))));
    assert_eq!((at_fast.len(), at_slow.len()), (3, 3));
    // The fast peer delivers every 100 ms and is handed the rest.
    let mut dups = Vec::new();
    for t in [100, 200, 300] {
        for (src, c) in std::mem::take(&mut at_fast) {
            for (s2, c2) in requested(&s.handle(ms(t), arrived(src, c))) {
                if at_slow.iter().any(|(_, x)| *x == c2) {
                    dups.push(c2);
                } else {
                    at_fast.push((s2, c2));
                }
            }
        }
    }
    // Peer 3 has delivered nothing while holding its requests for more than twice this
    // agent's usual 100 ms: a slow holder. Each of its three requests is duplicated at
    // the fast peer, beyond the budget of one.
    dups.sort_unstable();
    let mut slow: Vec<u32> = at_slow.iter().map(|(_, c)| *c).collect();
    slow.sort_unstable();
    assert_eq!(dups, slow);
    assert_eq!(s.stats().endgame_duplicates, 3);
}

#[test]
fn late_chunks_narrow_the_window_once_per_round_and_never_widen_it() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 1,
        hedge_after: ms(1000),
        endgame_chunks: 0,
        ..no_server()
    };
    let mut s = Scheduler::new(64, Bitfield::new(64), cfg, 8);
    let mut sent = Vec::new();
    for peer in 1..=20 {
        sent.extend(requested(
            &s.handle(ms(0), joined(peer, Bitfield::full(64))),
        ));
    }
    assert_eq!((sent.len(), s.peer_window()), (20, 32));
    // In time (under half the hedge delay): one wider, up to the limit.
    s.handle(ms(100), arrived(sent[0].0.clone(), sent[0].1));
    assert_eq!(s.peer_window(), 32);
    // Late: a quarter off; another late chunk of the same round changes nothing.
    s.handle(ms(600), arrived(sent[1].0.clone(), sent[1].1));
    assert_eq!(s.peer_window(), 24);
    s.handle(ms(650), arrived(sent[2].0.clone(), sent[2].1));
    assert_eq!(s.peer_window(), 24);
    assert_eq!(s.stats().late_chunks, 2);
}

#[test]
fn timeouts_strike_and_ban_after_max_strikes() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 1,
        ..no_server()
    };
    let mut s = Scheduler::new(3, Bitfield::new(3), cfg, 6);
    let mut last = requested(&s.handle(ms(0), joined(1, Bitfield::full(3))));
    assert_eq!(last.len(), 1);
    for strike in 1..=3u64 {
        let t = ms(10_000 * strike);
        assert_eq!(s.handle(t - ms(1), Event::Tick), vec![]);
        let actions = s.handle(t, Event::Tick);
        assert_eq!(actions[0], cancel(last[0].0.clone(), last[0].1));
        if strike < 3 {
            // Without the server the peer may be asked again until it is banned.
            last = requested(&actions);
            assert_eq!(last.len(), 1);
        } else {
            assert!(
                matches!(&actions[1..], [Action::Ban { peer: 1, .. }]),
                "{actions:?}"
            );
        }
    }
    assert!(s.is_banned(&1));
    assert_eq!(s.handle(ms(40_000), joined(1, Bitfield::full(3))), vec![]);
    assert_eq!(s.inflight(), 0);
    let st = s.stats();
    assert_eq!((st.timeouts, st.bans, st.cancels), (3, 1, 3));
}

#[test]
fn a_chunk_every_holder_failed_goes_to_the_server_at_once() {
    let mut s = Scheduler::new(1, Bitfield::new(1), SchedulerConfig::default(), 8);
    assert_eq!(
        s.handle(ms(0), joined(1, bits(1, [0]))),
        vec![request(P(1), 0)]
    );
    assert_eq!(
        s.handle(
            ms(100),
            Event::RequestFailed {
                source: P(1),
                chunk: 0
            }
        ),
        vec![request(Server, 0)]
    );
    assert_eq!(s.stats().failures, 1);
}

#[test]
fn a_bad_chunk_bans_its_peer_exactly_once() {
    let mut s = Scheduler::new(4, Bitfield::new(4), no_server(), 12);
    assert_eq!(
        requested(&s.handle(ms(0), joined(1, Bitfield::full(4)))).len(),
        4
    );
    let ban = s.handle(
        ms(10),
        Event::ChunkBad {
            source: P(1),
            chunk: 0,
        },
    );
    assert!(matches!(&ban[..], [Action::Ban { peer: 1, .. }]), "{ban:?}");
    assert_eq!(s.inflight(), 0, "its other requests are forgotten");
    assert_eq!(
        s.handle(
            ms(11),
            Event::ChunkBad {
                source: P(1),
                chunk: 1
            }
        ),
        vec![]
    );
    assert_eq!(s.handle(ms(12), arrived(P(1), 2)), vec![]);
    assert_eq!(s.handle(ms(13), joined(1, Bitfield::full(4))), vec![]);
    assert_eq!(s.have().count(), 0);
    // Its chunks are requestable again from an honest peer.
    let again = requested(&s.handle(ms(20), joined(2, Bitfield::full(4))));
    assert_eq!(again.len(), 4);
    assert!(again.iter().all(|(src, _)| *src == P(2)));
    assert_eq!(s.stats().bans, 1);
}

#[test]
fn unrequested_or_repeated_arrivals_are_ignored() {
    let mut s = Scheduler::new(2, Bitfield::new(2), no_server(), 0);
    assert_eq!(s.handle(ms(0), arrived(P(7), 0)), vec![]);
    assert_eq!(s.handle(ms(1), arrived(Server, 1)), vec![]);
    assert_eq!(s.handle(ms(2), arrived(P(7), 99)), vec![]);
    assert_eq!(s.have().count(), 0);
    assert_eq!(s.stats(), SchedulerStats::default());
    assert_eq!(
        s.handle(ms(3), joined(1, bits(2, [0]))),
        vec![request(P(1), 0)]
    );
    assert_eq!(s.handle(ms(4), arrived(P(1), 0)), vec![]);
    assert_eq!(s.handle(ms(5), arrived(P(1), 0)), vec![]);
    assert_eq!(s.stats().chunks_from_peers, 1);
}

#[test]
fn server_busy_voids_server_requests_and_blocks_the_server() {
    let mut s: Scheduler<Peer> = Scheduler::new(2, Bitfield::new(2), SchedulerConfig::default(), 1);
    assert_eq!(s.handle(ms(0), Event::Tick), vec![]);
    let mut first = requested(&s.handle(ms(500), Event::Tick));
    first.sort();
    assert_eq!(first, vec![(Server, 0), (Server, 1)]);
    let busy = s.handle(
        ms(600),
        Event::ServerBusy {
            retry_after: ms(2000),
            holders: vec![],
        },
    );
    assert_eq!(busy.len(), 2);
    assert!(
        busy.iter()
            .all(|a| matches!(a, Action::Cancel { source: Server, .. }))
    );
    for t in (700..2600).step_by(100) {
        assert_eq!(s.handle(ms(t), Event::Tick), vec![], "at {t} ms");
    }
    assert_eq!(requested(&s.handle(ms(2600), Event::Tick)).len(), 2);
    assert_eq!(s.stats().server_busy, 1);
}

#[test]
fn a_departed_peer_frees_its_requests() {
    let cfg = SchedulerConfig {
        max_inflight_per_peer: 1,
        ..no_server()
    };
    let mut s = Scheduler::new(2, Bitfield::new(2), cfg, 3);
    let a = requested(&s.handle(ms(0), joined(1, Bitfield::full(2))));
    let b = requested(&s.handle(ms(1), joined(2, Bitfield::full(2))));
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_eq!(s.handle(ms(2), Event::PeerLeft { peer: 1 }), vec![]);
    assert_eq!(s.inflight(), 1);
    assert_eq!(
        s.handle(ms(3), arrived(P(1), a[0].1)),
        vec![],
        "void after leaving"
    );
    assert_eq!(
        s.handle(ms(4), arrived(P(2), b[0].1)),
        vec![request(P(2), a[0].1)]
    );
}

#[test]
fn same_seed_same_run_different_seed_other_run() {
    let world = |seed| World {
        chunks: 40,
        have: Bitfield::new(40),
        peers: (0..4)
            .map(|i| SimPeer::honest(Bitfield::full(40), i * 10, 40 + i * 30))
            .collect(),
        server_delay_ms: 30,
        server_busy: 0,
        retry_after_ms: 0,
        config: SchedulerConfig::default(),
        seed,
    };
    assert_eq!(world(1).run().trace, world(1).run().trace);
    assert_ne!(world(1).run().trace, world(2).run().trace);
}

// ----- the simulated world --------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Serves every chunk it announces after its delay.
    Honest,
    /// Answers every request with a chunk that fails verification.
    Bad,
    /// Announces chunks it does not have and never answers.
    Liar,
    /// Serves, but slowly (its delay is long, often past the request timeout).
    Stall,
    /// Refuses every request.
    Refuse,
}

#[derive(Debug, Clone)]
struct SimPeer {
    behaviour: Behaviour,
    have: Bitfield,
    join_ms: u64,
    leave_ms: Option<u64>,
    delay_ms: u64,
    /// Chunks announced later: (ms after joining, chunk).
    later: Vec<(u64, u32)>,
}

impl SimPeer {
    fn honest(have: Bitfield, join_ms: u64, delay_ms: u64) -> Self {
        Self {
            behaviour: Behaviour::Honest,
            have,
            join_ms,
            leave_ms: None,
            delay_ms,
            later: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct World {
    chunks: u32,
    have: Bitfield,
    peers: Vec<SimPeer>,
    server_delay_ms: u64,
    /// The first this-many server requests are answered "busy".
    server_busy: u32,
    retry_after_ms: u64,
    config: SchedulerConfig,
    seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Arrived,
    Bad,
    Failed,
    Busy,
}

#[derive(Debug, Clone)]
enum SimEvent {
    Join(Peer),
    Leave(Peer),
    Have(Peer, u32),
    Reply {
        source: Source<Peer>,
        chunk: u32,
        id: u64,
        reply: Reply,
    },
    Tick,
}

/// A time-ordered queue of simulated events (FIFO among equal times).
#[derive(Default)]
struct Agenda {
    events: BTreeMap<(u64, u64), SimEvent>,
    seq: u64,
}

impl Agenda {
    fn at(&mut self, t: u64, event: SimEvent) {
        self.seq += 1;
        self.events.insert((t, self.seq), event);
    }

    fn pop(&mut self) -> Option<(u64, SimEvent)> {
        self.events.pop_first().map(|((t, _), e)| (t, e))
    }
}

#[derive(Debug)]
struct Outcome {
    trace: Vec<(Duration, Action<Peer>)>,
    done_at: Option<Duration>,
    stats: SchedulerStats,
    /// (time, chunk) of every server request.
    server_requests: Vec<(Duration, u32)>,
    banned: BTreeSet<Peer>,
    /// Peers whose bad chunk reached the scheduler.
    sent_bad: BTreeSet<Peer>,
}

const TICK_MS: u64 = 100;
const LIMIT_MS: u64 = 4 * 3600 * 1000;

/// The driver's view: what is outstanding, who is connected, what each peer announced.
/// It checks the scheduler's promises on every action.
struct Driver<'w> {
    world: &'w World,
    config: SchedulerConfig,
    outstanding: BTreeMap<(u32, Source<Peer>), u64>,
    next_id: u64,
    connected: BTreeSet<Peer>,
    announced: Vec<Bitfield>,
    server_busy_left: u32,
    server_blocked_until: Duration,
    out: Outcome,
}

impl Driver<'_> {
    fn void_peer(&mut self, peer: Peer) {
        self.outstanding
            .retain(|(_, src), _| !matches!(src, Source::Peer(p) if *p == peer));
    }

    fn apply(
        &mut self,
        now: Duration,
        have: &Bitfield,
        actions: Vec<Action<Peer>>,
        agenda: &mut Agenda,
    ) {
        let t = now.as_millis() as u64;
        for action in actions {
            assert!(self.out.done_at.is_none(), "{action:?} after Done");
            self.out.trace.push((now, action.clone()));
            match action {
                Action::Request { source, chunk } => {
                    assert!(
                        chunk < self.world.chunks && !have.get(chunk),
                        "request for chunk {chunk} already here"
                    );
                    let id = self.next_id;
                    self.next_id += 1;
                    let prev = self.outstanding.insert((chunk, source.clone()), id);
                    assert!(prev.is_none(), "chunk {chunk} asked twice from {source:?}");
                    let reply = match &source {
                        Source::Peer(p) => {
                            assert!(
                                self.connected.contains(p),
                                "asked peer {p}, which is not connected"
                            );
                            assert!(!self.out.banned.contains(p), "asked banned peer {p}");
                            assert!(
                                self.announced[*p as usize].get(chunk),
                                "asked peer {p} for chunk {chunk}, which it never announced"
                            );
                            let peer = &self.world.peers[*p as usize];
                            let kind = match peer.behaviour {
                                Behaviour::Honest | Behaviour::Stall => Some(Reply::Arrived),
                                Behaviour::Bad => Some(Reply::Bad),
                                Behaviour::Liar => None,
                                Behaviour::Refuse => Some(Reply::Failed),
                            };
                            kind.map(|k| (peer.delay_ms, k))
                        }
                        Source::Server => {
                            assert!(
                                self.config.server_allowed,
                                "asked the server while it is not allowed"
                            );
                            assert!(
                                now >= self.server_blocked_until,
                                "asked the server before retry_after"
                            );
                            self.out.server_requests.push((now, chunk));
                            if self.server_busy_left > 0 {
                                self.server_busy_left -= 1;
                                Some((self.world.server_delay_ms, Reply::Busy))
                            } else {
                                Some((self.world.server_delay_ms, Reply::Arrived))
                            }
                        }
                    };
                    if let Some((delay, reply)) = reply {
                        agenda.at(
                            t + delay,
                            SimEvent::Reply {
                                source,
                                chunk,
                                id,
                                reply,
                            },
                        );
                    }
                }
                Action::Cancel { source, chunk } => {
                    assert!(
                        self.outstanding.remove(&(chunk, source.clone())).is_some(),
                        "cancelled chunk {chunk} at {source:?}, which was not outstanding"
                    );
                }
                Action::Ban { peer, .. } => {
                    assert!(self.out.banned.insert(peer), "peer {peer} banned twice");
                    self.connected.remove(&peer);
                    self.void_peer(peer);
                }
                Action::Done => {
                    assert!(have.is_full(), "Done before every chunk is here");
                    self.out.done_at = Some(now);
                }
            }
        }
    }

    fn check_limits(&self, scheduler: &Scheduler<Peer>) {
        let mut per_source: BTreeMap<&Source<Peer>, usize> = BTreeMap::new();
        let mut per_chunk: BTreeMap<u32, usize> = BTreeMap::new();
        for (chunk, src) in self.outstanding.keys() {
            *per_source.entry(src).or_default() += 1;
            *per_chunk.entry(*chunk).or_default() += 1;
        }
        for (chunk, n) in per_chunk {
            assert!(
                n <= 2,
                "{n} requests outstanding for chunk {chunk}: one duplicate at most"
            );
        }
        for (src, n) in per_source {
            let limit = match src {
                Source::Peer(_) => self.config.max_inflight_per_peer,
                Source::Server => self.config.server_max_inflight,
            };
            assert!(
                n <= limit,
                "{n} requests outstanding at {src:?}, limit {limit}"
            );
        }
        assert!(self.outstanding.len() <= self.config.max_inflight_total);
        assert_eq!(scheduler.inflight(), self.outstanding.len());
    }
}

impl World {
    fn run(&self) -> Outcome {
        let mut scheduler = Scheduler::new(
            self.chunks,
            self.have.clone(),
            self.config.clone(),
            self.seed,
        );
        let mut agenda = Agenda::default();
        for (i, p) in self.peers.iter().enumerate() {
            let i = i as Peer;
            agenda.at(p.join_ms, SimEvent::Join(i));
            for &(after, c) in &p.later {
                agenda.at(p.join_ms + after, SimEvent::Have(i, c));
            }
            if let Some(t) = p.leave_ms {
                agenda.at(t, SimEvent::Leave(i));
            }
        }
        agenda.at(0, SimEvent::Tick);
        let mut d = Driver {
            world: self,
            config: scheduler.config().clone(),
            outstanding: BTreeMap::new(),
            next_id: 0,
            connected: BTreeSet::new(),
            announced: vec![Bitfield::new(self.chunks); self.peers.len()],
            server_busy_left: self.server_busy,
            server_blocked_until: Duration::ZERO,
            out: Outcome {
                trace: Vec::new(),
                done_at: None,
                stats: SchedulerStats::default(),
                server_requests: Vec::new(),
                banned: BTreeSet::new(),
                sent_bad: BTreeSet::new(),
            },
        };
        let mut now = Duration::ZERO;
        while let Some((t, sim)) = agenda.pop() {
            if t > LIMIT_MS {
                break;
            }
            now = ms(t);
            let event = match sim {
                SimEvent::Tick => {
                    agenda.at(t + TICK_MS, SimEvent::Tick);
                    Some(Event::Tick)
                }
                SimEvent::Join(p) if !d.out.banned.contains(&p) => {
                    let have = self.peers[p as usize].have.clone();
                    d.connected.insert(p);
                    d.announced[p as usize] = have.clone();
                    Some(Event::PeerJoined { peer: p, have })
                }
                SimEvent::Leave(p) if d.connected.remove(&p) => {
                    d.void_peer(p);
                    Some(Event::PeerLeft { peer: p })
                }
                SimEvent::Have(p, c) if d.connected.contains(&p) => {
                    d.announced[p as usize].set(c);
                    Some(Event::Have { peer: p, chunk: c })
                }
                SimEvent::Reply {
                    source,
                    chunk,
                    id,
                    reply,
                } if d.outstanding.get(&(chunk, source.clone())) == Some(&id) => {
                    if reply != Reply::Busy {
                        // Busy: the scheduler cancels every server request itself.
                        d.outstanding.remove(&(chunk, source.clone()));
                    }
                    match reply {
                        Reply::Arrived => Some(Event::ChunkArrived { source, chunk }),
                        Reply::Bad => {
                            if let Source::Peer(p) = source {
                                d.out.sent_bad.insert(p);
                            }
                            Some(Event::ChunkBad { source, chunk })
                        }
                        Reply::Failed => Some(Event::RequestFailed { source, chunk }),
                        Reply::Busy => {
                            let retry_after = ms(self.retry_after_ms);
                            d.server_blocked_until = now + retry_after;
                            Some(Event::ServerBusy {
                                retry_after,
                                holders: Vec::new(),
                            })
                        }
                    }
                }
                // Banned, disconnected, cancelled or timed out: the driver drops it.
                _ => None,
            };
            let Some(event) = event else { continue };
            let busy = matches!(event, Event::ServerBusy { .. });
            let actions = scheduler.handle(now, event);
            d.apply(now, scheduler.have(), actions, &mut agenda);
            d.check_limits(&scheduler);
            // With retry_after = 0 the server may be asked again at once.
            if busy && self.retry_after_ms > 0 {
                assert!(
                    d.outstanding.keys().all(|(_, s)| *s != Source::Server),
                    "server requests survived ServerBusy"
                );
            }
            if scheduler.is_done() {
                break;
            }
        }
        if d.out.done_at.is_some() {
            assert_eq!(
                scheduler.handle(now + ms(1), Event::Tick),
                vec![],
                "actions after Done"
            );
            let st = scheduler.stats();
            assert_eq!(
                st.chunks_from_peers + st.chunks_from_server,
                u64::from(self.have.missing()),
                "every chunk counted once"
            );
            assert_eq!(scheduler.inflight(), 0);
        }
        d.out.stats = scheduler.stats();
        d.out
    }
}

// ----- property tests -------------------------------------------------------------------

fn arb_behaviour() -> BoxedStrategy<Behaviour> {
    prop_oneof![
        3 => Just(Behaviour::Honest),
        1 => Just(Behaviour::Bad),
        1 => Just(Behaviour::Liar),
        1 => Just(Behaviour::Stall),
        1 => Just(Behaviour::Refuse),
    ]
    .boxed()
}

fn arb_bits(len: u32, p: f64) -> impl Strategy<Value = Bitfield> {
    vec(proptest::bool::weighted(p), len as usize)
        .prop_map(move |v| bits(len, (0..len).filter(|&i| v[i as usize])))
}

fn arb_peer(
    chunks: u32,
    behaviour: BoxedStrategy<Behaviour>,
    may_leave: bool,
) -> impl Strategy<Value = SimPeer> {
    (
        behaviour,
        arb_bits(chunks, 0.5),
        0u64..3_000,
        (1u64..1_500, 4_000u64..30_000),
        vec((0u64..20_000, 0..chunks), 0..4),
        proptest::option::of(1_000u64..60_000),
    )
        .prop_map(
            move |(behaviour, have, join_ms, (delay, stall), later, leave)| SimPeer {
                behaviour,
                have,
                join_ms,
                leave_ms: leave.filter(|_| may_leave),
                delay_ms: if behaviour == Behaviour::Stall {
                    stall
                } else {
                    delay
                },
                later,
            },
        )
}

/// Small limits to stress them; the default timings.
fn arb_config(server_allowed: bool) -> impl Strategy<Value = SchedulerConfig> {
    (1usize..6, 1usize..16, 1usize..5, 0u32..10, 1u32..5).prop_map(
        move |(per_peer, total, server, endgame, strikes)| SchedulerConfig {
            max_inflight_per_peer: per_peer,
            max_inflight_total: total,
            server_max_inflight: server,
            endgame_chunks: endgame,
            max_strikes: strikes,
            server_allowed,
            ..SchedulerConfig::default()
        },
    )
}

/// Anything goes: honest and hostile peers joining, leaving and announcing at random;
/// the server allowed, sometimes busy.
fn arb_world() -> impl Strategy<Value = World> {
    (1u32..40)
        .prop_flat_map(|chunks| {
            (
                Just(chunks),
                arb_bits(chunks, 0.2),
                vec(arb_peer(chunks, arb_behaviour(), true), 0..6),
                (1u64..800, 0u32..4, 0u64..5_000),
                arb_config(true),
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                chunks,
                have,
                peers,
                (server_delay_ms, server_busy, retry_after_ms),
                config,
                seed,
            )| {
                World {
                    chunks,
                    have,
                    peers,
                    server_delay_ms,
                    server_busy,
                    retry_after_ms,
                    config,
                    seed,
                }
            },
        )
}

/// No server; honest peers that never leave hold every chunk between them; hostile
/// (and departing) peers mixed in.
fn arb_covered_world() -> impl Strategy<Value = World> {
    (1u32..40)
        .prop_flat_map(|chunks| {
            (
                Just(chunks),
                arb_bits(chunks, 0.2),
                vec(
                    arb_peer(chunks, Just(Behaviour::Honest).boxed(), false),
                    1..4,
                ),
                vec(arb_peer(chunks, arb_behaviour(), true), 0..5),
                arb_config(false),
                any::<u64>(),
            )
        })
        .prop_map(|(chunks, have, mut honest, others, config, seed)| {
            let n = honest.len();
            for c in 0..chunks {
                if !honest.iter().any(|p| p.have.get(c)) {
                    honest[c as usize % n].have.set(c);
                }
            }
            World {
                chunks,
                have,
                peers: honest.into_iter().chain(others).collect(),
                server_delay_ms: 1,
                server_busy: 0,
                retry_after_ms: 0,
                config,
                seed,
            }
        })
}

/// Honest peers, all there from the start, answering well within the fallback delay,
/// holding every chunk between them.
fn arb_generous_world() -> impl Strategy<Value = World> {
    (1u32..40)
        .prop_flat_map(|chunks| {
            (
                Just(chunks),
                vec((arb_bits(chunks, 0.5), 1u64..300), 1..5),
                arb_config(true),
                any::<u64>(),
            )
        })
        .prop_map(|(chunks, peers, config, seed)| {
            let mut peers: Vec<SimPeer> = peers
                .into_iter()
                .map(|(have, delay)| SimPeer::honest(have, 0, delay))
                .collect();
            let n = peers.len();
            for c in 0..chunks {
                if !peers.iter().any(|p| p.have.get(c)) {
                    peers[c as usize % n].have.set(c);
                }
            }
            World {
                chunks,
                have: Bitfield::new(chunks),
                peers,
                server_delay_ms: 1,
                server_busy: 0,
                retry_after_ms: 0,
                config,
                seed,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Also (inside `run`): never asks a peer for an unannounced chunk, never exceeds a
    /// limit, never bans twice, emits `Done` once and nothing after it.
    #[test]
    fn completes_with_the_server_whatever_peers_do(world in arb_world()) {
        let out = world.run();
        prop_assert!(out.done_at.is_some(), "did not complete: {:?}", out.stats);
        prop_assert_eq!(out.trace.iter().filter(|(_, a)| *a == Action::Done).count(), 1);
        for p in &out.banned {
            prop_assert_ne!(world.peers[*p as usize].behaviour, Behaviour::Honest, "honest peer {} banned", p);
        }
        prop_assert!(out.sent_bad.is_subset(&out.banned), "a peer that sent a bad chunk was not banned");
    }

    #[test]
    fn completes_without_the_server_when_honest_peers_cover_every_chunk(world in arb_covered_world()) {
        let out = world.run();
        prop_assert!(out.done_at.is_some(), "did not complete: {:?}", out.stats);
        prop_assert_eq!(out.stats.requests_to_server, 0);
    }

    #[test]
    fn peers_that_answer_in_time_leave_the_server_alone(world in arb_generous_world()) {
        let out = world.run();
        prop_assert!(out.done_at.is_some());
        prop_assert_eq!(out.stats.requests_to_server, 0);
    }

    #[test]
    fn same_seed_same_actions(world in arb_world()) {
        prop_assert_eq!(world.run().trace, world.run().trace);
    }
}

#[test]
fn server_deferral_leaves_one_chunk_to_peers_and_keeps_other_server_requests() {
    use std::time::Duration;
    let config = SchedulerConfig {
        server_fallback_after: Duration::ZERO,
        server_max_inflight: 2,
        ..SchedulerConfig::default()
    };
    let mut s: Scheduler<u32> = Scheduler::new(2, Bitfield::new(2), config, 1);
    let t = Duration::from_millis(1);
    let first = s.handle(t, Event::Tick);
    let asked: Vec<u32> = first
        .iter()
        .filter_map(|a| match a {
            Action::Request {
                source: Source::Server,
                chunk,
            } => Some(*chunk),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), 2, "{first:?}");
    // The server defers chunk asked[0]; the other request stays, nothing is cancelled.
    let out = s.handle(
        t,
        Event::ServerDeferred {
            chunk: asked[0],
            retry_after: Duration::from_secs(1),
        },
    );
    assert!(
        out.iter().all(|a| !matches!(a, Action::Cancel { .. })),
        "{out:?}"
    );
    assert!(
        !out.iter().any(
            |a| matches!(a, Action::Request { source: Source::Server, chunk } if *chunk == asked[0])
        ),
        "not asked again before retry_after"
    );
    assert_eq!(s.inflight(), 1);
    // A peer that has it gets the request.
    let mut have = Bitfield::new(2);
    have.set(asked[0]);
    let out = s.handle(t, Event::PeerJoined { peer: 7, have });
    assert!(
        out.contains(&Action::Request {
            source: Source::Peer(7),
            chunk: asked[0]
        }),
        "{out:?}"
    );
}
