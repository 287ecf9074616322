//! Plugin fetches the coordinator serves, as an operator means the word. Agents ask for
//! a content one chunk per `DownloadPlugin` call (herd-checked), so calls say little; a
//! *fetch* is one agent getting one content, from the first chunk served to it until
//!
//! - every chunk of the content has been served to it (`complete`),
//! - it asked for none for [`IDLE`] (`partial`: the rest came from peers, or it gave up),
//! - a chunk could not be served (`failed`: the stored content is unreadable or corrupt).
//!
//! Ended fetches are counted in `plugin_download_total{status}` with their duration
//! (first to last chunk served) in `plugin_download_duration_seconds`; the open ones are
//! the coordinator's in-flight fetches (`arcadectl fleet status`). At most [`MAX_OPEN`]
//! are tracked: past that, the longest idle one ends as `partial`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arcade_p2p::ContentId;
use arcade_p2p::mesh::bitfield::Bitfield;

/// A fetch whose agent asked for nothing this long has ended.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// Most open fetches tracked.
pub(crate) const MAX_OPEN: usize = 65_536;

struct Fetch {
    plugin_id: String,
    version: String,
    served: Bitfield,
    bytes: u64,
    first: Instant,
    last: Instant,
}

/// A fetch that ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ended {
    pub plugin_id: String,
    pub version: String,
    /// `complete`, `partial` or `failed`.
    pub status: &'static str,
    /// First to last chunk served.
    pub took: Duration,
    /// Bytes sent for it.
    pub bytes: u64,
}

/// A content being fetched from the coordinator now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub content: ContentId,
    pub plugin_id: String,
    pub version: String,
    /// Agents fetching it.
    pub agents: u32,
    /// Bytes sent to them so far.
    pub bytes: u64,
}

/// Counts an ended fetch in `plugin_download_total` and, unless it failed,
/// `plugin_download_duration_seconds`.
pub(crate) fn record(metrics: &crate::metrics::Metrics, ended: &Ended) {
    metrics
        .downloads
        .get_or_create(&crate::metrics::DownloadLabels {
            plugin_id: ended.plugin_id.clone(),
            version: ended.version.clone(),
            status: ended.status.into(),
        })
        .inc();
    if ended.status != "failed" {
        metrics
            .download_duration
            .get_or_create(&crate::metrics::PluginIdLabel {
                plugin_id: ended.plugin_id.clone(),
            })
            .observe(ended.took.as_secs_f64());
    }
}

/// The open fetches.
#[derive(Default)]
pub(crate) struct FetchBook {
    open: HashMap<(String, ContentId), Fetch>,
}

impl FetchBook {
    /// Chunk `index` of `content` (of `chunks` chunks), `bytes` on the wire, went to
    /// `agent`; returns the fetch it completed, or the one pushed out to make room.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn served(
        &mut self,
        agent: &str,
        content: ContentId,
        plugin_id: &str,
        version: &str,
        chunks: u32,
        index: u32,
        bytes: u64,
        now: Instant,
    ) -> Option<Ended> {
        let key = (agent.to_owned(), content);
        let mut pushed_out = None;
        if !self.open.contains_key(&key) && self.open.len() >= MAX_OPEN {
            let idlest = self
                .open
                .iter()
                .min_by_key(|(_, f)| f.last)
                .map(|(k, _)| k.clone());
            if let Some(k) = idlest {
                pushed_out = self.end(&k, "partial");
            }
        }
        let fetch = self.open.entry(key.clone()).or_insert_with(|| Fetch {
            plugin_id: plugin_id.to_owned(),
            version: version.to_owned(),
            served: Bitfield::new(chunks),
            bytes: 0,
            first: now,
            last: now,
        });
        if index < fetch.served.len() {
            fetch.served.set(index);
        }
        fetch.bytes += bytes;
        fetch.last = now;
        if fetch.served.is_full() {
            return self.end(&key, "complete");
        }
        pushed_out
    }

    /// Serving `agent` a chunk of `content` failed: its fetch (if any) ended.
    pub(crate) fn failed(&mut self, agent: &str, content: ContentId) -> Option<Ended> {
        self.end(&(agent.to_owned(), content), "failed")
    }

    /// Ends the fetches idle since before `now - IDLE`.
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<Ended> {
        let idle: Vec<_> = self
            .open
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        idle.iter().filter_map(|k| self.end(k, "partial")).collect()
    }

    /// Open fetches by content, most agents first.
    pub(crate) fn in_flight(&self) -> Vec<InFlight> {
        let mut by: HashMap<ContentId, InFlight> = HashMap::new();
        for ((_, content), f) in &self.open {
            let e = by.entry(*content).or_insert_with(|| InFlight {
                content: *content,
                plugin_id: f.plugin_id.clone(),
                version: f.version.clone(),
                agents: 0,
                bytes: 0,
            });
            e.agents += 1;
            e.bytes += f.bytes;
        }
        let mut out: Vec<InFlight> = by.into_values().collect();
        out.sort_by(|a, b| b.agents.cmp(&a.agents).then(a.plugin_id.cmp(&b.plugin_id)));
        out
    }

    fn end(&mut self, key: &(String, ContentId), status: &'static str) -> Option<Ended> {
        let f = self.open.remove(key)?;
        Some(Ended {
            plugin_id: f.plugin_id,
            version: f.version,
            status,
            took: f.last.saturating_duration_since(f.first),
            bytes: f.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> ContentId {
        ContentId::from_bytes([n; 32])
    }

    #[test]
    fn complete_partial_failed_and_in_flight() {
        let mut book = FetchBook::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // a gets all three chunks over three calls: one complete fetch.
        assert_eq!(book.served("a", c(1), "p", "1.0.0", 3, 0, 10, t0), None);
        assert_eq!(
            book.served("a", c(1), "p", "1.0.0", 3, 2, 10, t0 + s(1)),
            None
        );
        // b gets one chunk of the same content (the rest from peers).
        assert_eq!(
            book.served("b", c(1), "p", "1.0.0", 3, 1, 10, t0 + s(1)),
            None
        );
        assert_eq!(
            book.in_flight(),
            vec![InFlight {
                content: c(1),
                plugin_id: "p".into(),
                version: "1.0.0".into(),
                agents: 2,
                bytes: 30,
            }]
        );
        let done = book
            .served("a", c(1), "p", "1.0.0", 3, 1, 10, t0 + s(2))
            .unwrap();
        assert_eq!((done.status, done.took, done.bytes), ("complete", s(2), 30));
        // Nothing for IDLE: b's fetch ends partial; a fresh one is untouched.
        assert_eq!(
            book.served("c", c(2), "q", "2.0.0", 5, 0, 7, t0 + s(20)),
            None
        );
        let ended = book.sweep(t0 + s(1) + IDLE);
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].status, ended[0].bytes), ("partial", 10));
        assert_eq!(book.in_flight().len(), 1);
        assert_eq!(book.failed("c", c(2)).unwrap().status, "failed");
        assert!(book.failed("c", c(2)).is_none());
        assert!(book.in_flight().is_empty());
    }

    #[test]
    fn the_book_is_bounded() {
        let mut book = FetchBook::default();
        let t0 = Instant::now();
        for i in 0..MAX_OPEN {
            let agent = format!("a{i}");
            let at = t0 + Duration::from_millis(i as u64);
            assert!(book.served(&agent, c(1), "p", "1", 4, 0, 1, at).is_none());
        }
        let out = book
            .served(
                "late",
                c(1),
                "p",
                "1",
                4,
                0,
                1,
                t0 + Duration::from_secs(100),
            )
            .expect("the idlest fetch makes room");
        assert_eq!(out.status, "partial");
        assert_eq!(book.open.len(), MAX_OPEN);
        assert!(!book.open.contains_key(&("a0".to_owned(), c(1))));
    }
}
