//! The fleet in memory: every registered agent with its token, liveness and ticket
//! expiry, and the indexes requests use instead of scanning the fleet — token → agent,
//! content → holders (peer hints, herd redirects), label → agents ("could any agent ever
//! run this job?"), content → agents fetching it now.
//!
//! Rebuilt from the store at start ([`Fleet::insert`] per agent record). Liveness
//! (`last_seen`) lives only here: a heartbeat writes nothing to the store. Every method
//! is in-memory work bounded by one agent's own lists, never by the fleet's size.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use arcade_p2p::labels::Labels;

use crate::dispatch::Need;
use crate::store::{AgentRecord, Installed};

/// Most fetchers remembered per content (the most recent are kept).
pub(crate) const MAX_FETCHERS_REMEMBERED: usize = 256;

/// An agent as the coordinator sees it now.
#[derive(Debug, Clone)]
pub(crate) struct LiveAgent {
    pub(crate) record: Arc<AgentRecord>,
    /// Its labels, shared with its dispatch waiters.
    pub(crate) labels: Arc<Labels>,
    /// Unix ms of the last authenticated call since start (0 = none).
    pub(crate) last_seen: i64,
    /// Expiry (unix ms) of the mesh ticket last issued to it since start (0 = none).
    pub(crate) ticket_expires_at: i64,
    /// Contents it said it is fetching in its last heartbeat (SHA-256 hex, at most
    /// [`MAX_FETCHING`]).
    pub(crate) fetching: Vec<String>,
}

/// Most contents an agent's heartbeat is believed to be fetching.
pub(crate) const MAX_FETCHING: usize = 64;

/// Agents holding one content, in a vector (for a bounded scan from any offset) with
/// positions (for O(1) removal).
#[derive(Debug, Default)]
pub(crate) struct Holders {
    pub(crate) list: Vec<String>,
    pos: HashMap<String, usize>,
}

impl Holders {
    fn add(&mut self, agent: &str) {
        if !self.pos.contains_key(agent) {
            self.pos.insert(agent.to_owned(), self.list.len());
            self.list.push(agent.to_owned());
        }
    }

    fn remove(&mut self, agent: &str) {
        if let Some(i) = self.pos.remove(agent) {
            self.list.swap_remove(i);
            if let Some(moved) = self.list.get(i) {
                self.pos.insert(moved.clone(), i);
            }
        }
    }
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    pub(crate) agents: HashMap<String, LiveAgent>,
    /// Token hash → agent id.
    pub(crate) tokens: HashMap<[u8; 32], String>,
    /// Content SHA-256 (hex) → agents that hold it.
    pub(crate) holders: HashMap<String, Holders>,
    /// `(key, value)` → registered agents carrying that label.
    by_label: HashMap<(String, String), HashSet<String>>,
    /// SHA-256 → agents handed the plugin's manifest without holding it (they are
    /// fetching it), with when (unix ms), oldest first; at most
    /// [`MAX_FETCHERS_REMEMBERED`] per content. Named in peer hints with
    /// `complete = false`.
    pub(crate) fetching: HashMap<String, VecDeque<(String, i64)>>,
}

fn contents(list: &[Installed]) -> HashSet<&str> {
    list.iter().map(|i| i.sha256.as_str()).collect()
}

impl Fleet {
    /// Registered agents.
    pub(crate) fn len(&self) -> usize {
        self.agents.len()
    }

    /// Adds or replaces an agent; its previous token (if any) stops being valid.
    pub(crate) fn insert(&mut self, record: AgentRecord, last_seen: i64) {
        let id = record.agent_id.clone();
        self.remove(&id);
        self.tokens.insert(record.token_hash, id.clone());
        for sha in contents(&record.installed) {
            self.holders.entry(sha.to_owned()).or_default().add(&id);
        }
        for (k, v) in &record.labels {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(id.clone());
        }
        let labels = Arc::new(record.labels.clone());
        self.agents.insert(
            id,
            LiveAgent {
                record: Arc::new(record),
                labels,
                last_seen,
                ticket_expires_at: 0,
                fetching: Vec::new(),
            },
        );
    }

    /// Forgets an agent: its token, its holdings, its labels.
    pub(crate) fn remove(&mut self, agent_id: &str) -> Option<LiveAgent> {
        let live = self.agents.remove(agent_id)?;
        self.tokens.remove(&live.record.token_hash);
        for sha in contents(&live.record.installed) {
            if let Some(h) = self.holders.get_mut(sha) {
                h.remove(agent_id);
                if h.list.is_empty() {
                    self.holders.remove(sha);
                }
            }
        }
        for (k, v) in &live.record.labels {
            let key = (k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&key) {
                set.remove(agent_id);
                if set.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
        Some(live)
    }

    /// Replaces an agent's installed list; false when it is unchanged (nothing to
    /// write) or the agent is unknown.
    pub(crate) fn set_installed(&mut self, agent_id: &str, installed: Vec<Installed>) -> bool {
        let Some(live) = self.agents.get_mut(agent_id) else {
            return false;
        };
        if live.record.installed == installed {
            return false;
        }
        let old: HashSet<String> = contents(&live.record.installed)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let new: HashSet<String> = contents(&installed)
            .into_iter()
            .map(str::to_owned)
            .collect();
        for gone in old.difference(&new) {
            if let Some(h) = self.holders.get_mut(gone) {
                h.remove(agent_id);
                if h.list.is_empty() {
                    self.holders.remove(gone);
                }
            }
        }
        for added in new.difference(&old) {
            self.holders.entry(added.clone()).or_default().add(agent_id);
        }
        let mut record = (*live.record).clone();
        record.installed = installed;
        live.record = Arc::new(record);
        true
    }

    /// Whether some registered agent could run a job with `need`; else why not.
    pub(crate) fn unrunnable_reason(&self, need: &Need) -> Option<String> {
        if let Some(key) = need.conflict() {
            return Some(format!(
                "no agent can ever run it: it requires two values of label {key:?} (its label selector and its plugins' allowed_labels disagree)"
            ));
        }
        let pairs = need.pairs();
        let wanted = || {
            pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if pairs.is_empty() {
            return (self.agents.is_empty()).then(|| "no agent is registered".to_owned());
        }
        let mut smallest: Option<&HashSet<String>> = None;
        for pair in pairs {
            match self.by_label.get(pair) {
                None => {
                    return Some(format!(
                        "no registered agent carries the label {}={} (it needs {})",
                        pair.0,
                        pair.1,
                        wanted()
                    ));
                }
                Some(set) if smallest.is_none_or(|s| set.len() < s.len()) => smallest = Some(set),
                Some(_) => {}
            }
        }
        let any = smallest
            .into_iter()
            .flatten()
            .filter_map(|id| self.agents.get(id))
            .any(|a| need.satisfied_by(&a.record.labels));
        (!any).then(|| format!("no registered agent carries all of the labels {}", wanted()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, labels: &[(&str, &str)], holds: &[&str]) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            hostname: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            peer_id: String::new(),
            addrs: Vec::new(),
            agent_version: String::new(),
            installed: holds
                .iter()
                .map(|s| Installed {
                    plugin_id: "p".into(),
                    version: (*s).into(),
                    sha256: (*s).into(),
                })
                .collect(),
            registered_at: 0,
            token_hash: [id.len() as u8; 32],
            key_id: String::new(),
            proof_at: 0,
            granted: Default::default(),
        }
    }

    #[test]
    fn holders_follow_registrations_installs_and_removals() {
        let mut f = Fleet::default();
        f.insert(agent("a", &[], &["x", "y"]), 0);
        f.insert(agent("bb", &[], &["x"]), 0);
        assert_eq!(f.holders["x"].list.len(), 2);
        assert!(f.set_installed("a", agent("a", &[], &["y", "z"]).installed));
        assert!(!f.set_installed("a", agent("a", &[], &["y", "z"]).installed));
        assert_eq!(f.holders["x"].list, ["bb"]);
        assert_eq!(f.holders["z"].list, ["a"]);
        f.remove("bb");
        assert!(!f.holders.contains_key("x"));
        assert!(f.tokens.len() == 1);
        // Re-registering replaces, not duplicates.
        f.insert(agent("a", &[], &["y"]), 0);
        assert_eq!(f.holders["y"].list, ["a"]);
        assert!(!f.holders.contains_key("z"));
    }

    #[test]
    fn unrunnable_jobs_are_explained() {
        let mut f = Fleet::default();
        let need = |pairs: &[(&str, &str)]| {
            let l: Labels = pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect();
            Need::new(&l, [])
        };
        assert!(f.unrunnable_reason(&Need::default()).is_some());
        f.insert(agent("a", &[("team", "red"), ("os", "linux")], &[]), 0);
        f.insert(agent("b", &[("team", "blue")], &[]), 0);
        assert_eq!(f.unrunnable_reason(&need(&[("team", "red")])), None);
        let why = f.unrunnable_reason(&need(&[("team", "green")])).unwrap();
        assert!(why.contains("team=green"), "{why}");
        let why = f
            .unrunnable_reason(&need(&[("team", "blue"), ("os", "linux")]))
            .unwrap();
        assert!(why.contains("all of"), "{why}");
        f.remove("a");
        assert!(f.unrunnable_reason(&need(&[("os", "linux")])).is_some());
    }
}
