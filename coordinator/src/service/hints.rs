//! Peer hints: which agents an agent should fetch a content from. Agents that hold it
//! (complete), same zone first, most recently seen first; then a few agents fetching it
//! now (partial holders). Work per hint list is bounded ([`MAX_HOLDER_SCAN`] holders
//! looked at), whatever the number of holders in the fleet.

use std::hash::{DefaultHasher, Hash, Hasher};

use arcade_p2p::labels;
use arcade_proto::v1 as pb;

use super::fleet::{LiveAgent, MAX_FETCHERS_REMEMBERED};
use super::{Shared, allowed_labels, now_ms};
use crate::store::AgentRecord;

/// Most peer hints sent per plugin.
pub(crate) const MAX_PEER_HINTS: usize = 16;
/// Of the hints, at most this many name agents still fetching the plugin.
const MAX_FETCHER_HINTS: usize = 8;
/// Agents handed a manifest this long ago are no longer hinted as fetching it.
const FETCHER_HINT_WINDOW_MS: i64 = 10 * 60 * 1000;
/// Most holders looked at for one hint list: a window of the holder index starting at
/// an offset of the requester's own, so different requesters see different holders and
/// a content held by 10,000 agents costs no more than one held by 300.
const MAX_HOLDER_SCAN: usize = 256;

fn spread(agent_id: &str, len: usize) -> usize {
    let mut h = DefaultHasher::new();
    agent_id.hash(&mut h);
    (h.finish() % len.max(1) as u64) as usize
}

impl Shared {
    pub(crate) fn online(&self, live: &LiveAgent, now: i64) -> bool {
        let window = 3 * self.config.raw.jobs.heartbeat_interval.get().as_millis() as i64;
        live.last_seen > 0 && now - live.last_seen <= window
    }

    /// Hints for `requester` to fetch `plugin` (see the module doc). A requester that
    /// does not hold the plugin is remembered as fetching it, so agents fetching at once
    /// also fetch from each other (with complete holders only, a fleet fetching at once
    /// took everything from the few seeds).
    pub(crate) fn peer_hints(
        &self,
        requester: &AgentRecord,
        plugin: &pb::PluginVersion,
    ) -> Vec<pb::PeerHint> {
        let required = allowed_labels(plugin);
        let zone = requester.labels.get("zone");
        let now = now_ms();
        let mut fleet = self.fleet.lock().expect("fleet lock");
        let may_serve = |a: &LiveAgent| {
            a.record.agent_id != requester.agent_id
                && !a.record.peer_id.is_empty()
                && self.online(a, now)
                && labels::satisfies(&a.record.labels, &required)
        };
        let hint = |a: &LiveAgent, complete: bool| pb::PeerHint {
            agent_id: a.record.agent_id.clone(),
            peer_id: a.record.peer_id.clone(),
            addrs: a.record.addrs.clone(),
            complete,
            zone: a.record.labels.get("zone").cloned().unwrap_or_default(),
        };
        let mut holders: Vec<&LiveAgent> = Vec::new();
        if let Some(h) = fleet.holders.get(&plugin.sha256) {
            let n = h.list.len();
            let start = spread(&requester.agent_id, n);
            holders = (0..n.min(MAX_HOLDER_SCAN))
                .filter_map(|i| fleet.agents.get(&h.list[(start + i) % n]))
                .filter(|a| may_serve(a))
                .collect();
        }
        holders.sort_by_key(|a| (a.record.labels.get("zone") != zone, -a.last_seen));
        holders.truncate(MAX_PEER_HINTS);
        let mut hints: Vec<pb::PeerHint> = holders.iter().map(|a| hint(a, true)).collect();
        let holds = |a: &LiveAgent| a.record.installed.iter().any(|i| i.sha256 == plugin.sha256);
        let room = MAX_FETCHER_HINTS.min(MAX_PEER_HINTS.saturating_sub(hints.len()));
        let fetchers: Vec<&LiveAgent> = fleet
            .fetching
            .get(&plugin.sha256)
            .into_iter()
            .flatten()
            .filter(|(_, at)| now - at <= FETCHER_HINT_WINDOW_MS)
            .filter_map(|(id, _)| fleet.agents.get(id))
            .filter(|a| may_serve(a) && !holds(a))
            .collect();
        if !fetchers.is_empty() {
            // A different window of the fetchers for each requester, so a fleet does not
            // pile onto the first few.
            let start = spread(&requester.agent_id, fetchers.len());
            let n = room.min(fetchers.len());
            hints.extend((0..n).map(|i| hint(fetchers[(start + i) % fetchers.len()], false)));
        }
        if !requester
            .installed
            .iter()
            .any(|i| i.sha256 == plugin.sha256)
        {
            let list = fleet.fetching.entry(plugin.sha256.clone()).or_default();
            list.retain(|(id, at)| *id != requester.agent_id && now - at <= FETCHER_HINT_WINDOW_MS);
            if list.len() >= MAX_FETCHERS_REMEMBERED {
                list.pop_front();
            }
            list.push_back((requester.agent_id.clone(), now));
        }
        hints
    }
}
