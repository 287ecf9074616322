//! Herd protection: when many agents want the same content at once, the coordinator
//! hands each chunk out once and points later askers at the agents that already got it
//! (they serve it over the mesh), so its egress per content stays near one copy.
//!
//! A plain decision struct with no I/O and no clock of its own (sans-IO): the service
//! asks [`Herd::admit`] before serving a single-chunk request from a mesh-enabled agent
//! and reports what it served with [`Herd::served`]. An agent is redirected for a chunk
//! at most `max_redirects` times; after that it is served, so a fetch no peer can serve
//! still completes from the coordinator. State per content is bounded by the agents
//! that fetched it within `window` and is pruned as it ages.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arcade_p2p::ContentId;

/// How long a redirected agent leaves the chunk to its peers before asking again, after
/// its first redirect for that chunk; each further redirect doubles it, up to
/// [`REDIRECT_MAX_DOUBLINGS`] times ([`Herd::admit`] says how long in each redirect).
pub const REDIRECT_RETRY_AFTER: Duration = Duration::from_millis(300);

/// Most doublings of [`REDIRECT_RETRY_AFTER`] (300 ms → 4.8 s). A fixed 300 ms made a
/// fleet of 10,000 ask about every chunk it could not yet see from its peers three times a
/// second, and served it after `max_redirects` × 300 ms = 2.4 s — before the swarm had
/// carried the chunk to it: 17 M redirects and 2.6 copies of egress in the model. Growing
/// waits leave the swarm the time it needs while the first redirect stays quick.
pub const REDIRECT_MAX_DOUBLINGS: u32 = 4;

/// Most holders named in one redirect. Naming every recent holder sent a fleet of
/// thousands to the first few agents served (and grew the answer without bound); a few,
/// chosen differently for each asker and each retry, spread the askers over the swarm.
pub const MAX_REDIRECT_HOLDERS: usize = 4;

/// The decision for one chunk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send the chunk.
    Serve,
    /// Do not: these agents received it recently; ask again after `retry_after`.
    Redirect {
        /// Agents that received the chunk recently.
        holders: Vec<String>,
        /// How long the asker leaves the chunk to its peers before asking again.
        retry_after: Duration,
    },
}

#[derive(Default)]
struct ContentState {
    /// chunk → agents it was served to, with when.
    served: HashMap<u32, Vec<(String, Instant)>>,
    /// (agent, chunk) → redirects so far.
    redirects: HashMap<(String, u32), u32>,
}

/// Per-content memory of what was handed out.
pub struct Herd {
    window: Duration,
    max_redirects: u32,
    contents: HashMap<ContentId, ContentState>,
}

impl Herd {
    /// Remembers chunks handed out for `window`; redirects an agent at most
    /// `max_redirects` times per chunk (0 disables herd protection).
    pub fn new(window: Duration, max_redirects: u32) -> Self {
        Self {
            window,
            max_redirects,
            contents: HashMap::new(),
        }
    }

    /// Whether `agent` gets chunk `chunk` of `content` now. `usable` says whether a
    /// holder can serve `agent` (online, in the mesh, allowed to hold the content).
    pub fn admit(
        &mut self,
        content: ContentId,
        chunk: u32,
        agent: &str,
        now: Instant,
        usable: impl Fn(&str) -> bool,
    ) -> Admission {
        if self.max_redirects == 0 {
            return Admission::Serve;
        }
        let window = self.window;
        let state = self.contents.entry(content).or_default();
        // An agent asking again for a chunk it was given lost it: serve it.
        let asked_before = state
            .served
            .get(&chunk)
            .is_some_and(|l| l.iter().any(|(a, _)| a == agent));
        let mut holders: Vec<String> = state
            .served
            .get(&chunk)
            .into_iter()
            .flatten()
            .filter(|(a, at)| a != agent && now.duration_since(*at) <= window && usable(a))
            .map(|(a, _)| a.clone())
            .collect();
        let count = state
            .redirects
            .entry((agent.to_owned(), chunk))
            .or_default();
        if holders.len() > MAX_REDIRECT_HOLDERS {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut h = DefaultHasher::new();
            (agent, chunk, *count).hash(&mut h);
            let start = (h.finish() % holders.len() as u64) as usize;
            holders.rotate_left(start);
            holders.truncate(MAX_REDIRECT_HOLDERS);
        }
        if asked_before || holders.is_empty() || *count >= self.max_redirects {
            // Served: from now on this agent is the chunk's holder (it arrives there
            // in about one transfer time), so concurrent askers are pointed at it.
            self.served(content, chunk, agent, now);
            return Admission::Serve;
        }
        let retry_after = REDIRECT_RETRY_AFTER * (1 << (*count).min(REDIRECT_MAX_DOUBLINGS));
        *count += 1;
        Admission::Redirect {
            holders,
            retry_after,
        }
    }

    /// Records that `chunk` of `content` went to `agent`.
    pub fn served(&mut self, content: ContentId, chunk: u32, agent: &str, now: Instant) {
        let window = self.window;
        let state = self.contents.entry(content).or_default();
        let list = state.served.entry(chunk).or_default();
        list.retain(|(a, at)| a != agent && now.duration_since(*at) <= window);
        list.push((agent.to_owned(), now));
        state.redirects.remove(&(agent.to_owned(), chunk));
        // Forget contents nobody fetched within the window.
        self.contents.retain(|_, s| {
            s.served.retain(|_, l| {
                l.retain(|(_, at)| now.duration_since(*at) <= window);
                !l.is_empty()
            });
            !s.served.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(holders: &[&str], retry_after: Duration) -> Admission {
        Admission::Redirect {
            holders: holders.iter().map(|h| h.to_string()).collect(),
            retry_after,
        }
    }

    #[test]
    fn first_asker_is_served_later_askers_redirected_then_served() {
        let c = ContentId::of_bytes(b"c");
        let t = Instant::now();
        let mut h = Herd::new(Duration::from_secs(60), 2);
        assert_eq!(h.admit(c, 0, "a", t, |_| true), Admission::Serve);
        h.served(c, 0, "a", t);
        // Another chunk is still fresh for b: served (different chunks to different agents).
        assert_eq!(h.admit(c, 1, "b", t, |_| true), Admission::Serve);
        // Chunk 0 is in the swarm: b is pointed at a, twice (the second wait twice as
        // long), then served.
        assert_eq!(
            h.admit(c, 0, "b", t, |_| true),
            redirect(&["a"], REDIRECT_RETRY_AFTER)
        );
        assert_eq!(
            h.admit(c, 0, "b", t, |_| true),
            redirect(&["a"], REDIRECT_RETRY_AFTER * 2)
        );
        assert_eq!(h.admit(c, 0, "b", t, |_| true), Admission::Serve);
        // The holder itself is always served.
        assert_eq!(h.admit(c, 0, "a", t, |_| true), Admission::Serve);
    }

    #[test]
    fn a_redirect_names_a_few_holders_and_different_askers_get_different_ones() {
        let c = ContentId::of_bytes(b"c");
        let t = Instant::now();
        let mut h = Herd::new(Duration::from_secs(60), 8);
        for i in 0..100 {
            h.served(c, 0, &format!("h{i}"), t);
        }
        let mut named = std::collections::BTreeSet::new();
        for asker in 0..50 {
            let Admission::Redirect { holders, .. } =
                h.admit(c, 0, &format!("a{asker}"), t, |_| true)
            else {
                panic!("redirect expected")
            };
            assert_eq!(holders.len(), MAX_REDIRECT_HOLDERS);
            named.extend(holders);
        }
        assert!(
            named.len() > 50,
            "askers spread over the holders: {}",
            named.len()
        );
    }

    #[test]
    fn the_wait_doubles_with_each_redirect_up_to_its_cap() {
        let c = ContentId::of_bytes(b"c");
        let t = Instant::now();
        let mut h = Herd::new(Duration::from_secs(60), 100);
        h.served(c, 0, "a", t);
        let waits: Vec<u128> = (0..8)
            .map(|_| match h.admit(c, 0, "b", t, |_| true) {
                Admission::Redirect { retry_after, .. } => retry_after.as_millis(),
                Admission::Serve => panic!("redirect expected"),
            })
            .collect();
        assert_eq!(waits, [300, 600, 1200, 2400, 4800, 4800, 4800, 4800]);
        // Another chunk, or another asker, starts again at the first wait.
        h.served(c, 1, "a", t);
        assert_eq!(
            h.admit(c, 1, "b", t, |_| true),
            redirect(&["a"], REDIRECT_RETRY_AFTER)
        );
        assert_eq!(
            h.admit(c, 0, "z", t, |_| true),
            redirect(&["a"], REDIRECT_RETRY_AFTER)
        );
    }

    #[test]
    fn unusable_or_stale_holders_do_not_redirect() {
        let c = ContentId::of_bytes(b"c");
        let t = Instant::now();
        let mut h = Herd::new(Duration::from_secs(10), 2);
        h.served(c, 0, "a", t);
        assert_eq!(
            h.admit(c, 0, "b", t, |_| false),
            Admission::Serve,
            "holder offline"
        );
        let later = t + Duration::from_secs(11);
        assert_eq!(
            h.admit(c, 0, "b", later, |_| true),
            Admission::Serve,
            "holder too old"
        );
        h.served(c, 0, "b", later);
        assert!(
            h.contents[&c].served[&0].iter().all(|(a, _)| a == "b"),
            "stale entries pruned"
        );
        // Concurrent askers: the first admitted agent is a holder at once.
        let d = ContentId::of_bytes(b"d");
        assert_eq!(h.admit(d, 3, "x", t, |_| true), Admission::Serve);
        assert_eq!(
            h.admit(d, 3, "y", t, |_| true),
            redirect(&["x"], REDIRECT_RETRY_AFTER)
        );
        let mut off = Herd::new(Duration::from_secs(10), 0);
        off.served(c, 0, "a", t);
        assert_eq!(
            off.admit(c, 0, "b", t, |_| true),
            Admission::Serve,
            "disabled"
        );
    }
}
