//! Preheat: an admin asks the agents that match some labels to fetch a plugin version
//! in the background and pin it against eviction, before any job needs it.
//!
//! The coordinator keeps the active preheats in memory (at most `plugin.max_preheats`;
//! a restart ends them, while agents keep their pins until their own timers end). Each
//! heartbeat answer carries an order for every active preheat the agent matches and has
//! not reported on; the agent fetches over the mesh like a job would (same herd
//! protection, same verification), and its next heartbeats report `FETCHING`, then
//! `DONE` or `FAILED` with the bytes it got from peers and from the coordinator. A
//! re-registered agent (restarted: its pins are gone) is told again.
//!
//! Costs: a heartbeat checks the active preheats (bounded) against the agent's labels;
//! `GetPreheat` scans the fleet once (an admin call).

use std::collections::HashMap;

use arcade_p2p::labels::{self, Labels};
use arcade_p2p::{PluginRef, PluginSelector};
use arcade_proto::v1 as pb;
use rand::RngCore as _;
use tonic::Status;

use super::{Shared, allowed_labels, now_ms, shown};
use crate::config::MAX_PREHEAT_PIN;
use crate::store::AgentRecord;

/// Most reports one heartbeat may carry.
const MAX_REPORTS: usize = 1024;
/// Longest error kept per report.
const MAX_ERROR_BYTES: usize = 1024;
/// Most unfinished targets listed in a status (the counts are complete).
const MAX_LISTED: usize = 1000;

/// What one agent said about a preheat.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    state: pb::PreheatState,
    error: String,
    peer_bytes: u64,
    coordinator_bytes: u64,
}

/// One active preheat.
#[derive(Debug, Clone)]
pub(crate) struct Preheat {
    /// What it is (the counts and targets are filled in when asked).
    base: pb::PreheatStatus,
    /// The preheat's labels with the plugin's `allowed_labels`: an agent must carry all.
    required: Labels,
    /// Agent id → its last report.
    reports: HashMap<String, Report>,
}

/// The active preheats. See the module doc.
#[derive(Debug, Default)]
pub(crate) struct PreheatBook {
    list: Vec<Preheat>,
}

impl PreheatBook {
    fn expire(&mut self, now: i64) {
        self.list.retain(|p| p.base.expires_at > now);
    }

    /// Adds `preheat`, replacing an active one of the same content and labels (its
    /// agents are told again, and pin for the new time).
    fn add(&mut self, preheat: Preheat, max: usize, now: i64) -> Result<(), Status> {
        self.expire(now);
        self.list
            .retain(|p| !(p.base.sha256 == preheat.base.sha256 && p.required == preheat.required));
        if self.list.len() >= max {
            return Err(Status::resource_exhausted(format!(
                "{} preheats are active (plugin.max_preheats); each ends when its pin time ends",
                self.list.len()
            )));
        }
        self.list.push(preheat);
        Ok(())
    }

    /// Orders for `agent`: every active preheat it matches and has not reported on.
    pub(crate) fn orders_for(&mut self, agent: &AgentRecord, now: i64) -> Vec<pb::PreheatOrder> {
        self.expire(now);
        self.list
            .iter()
            .filter(|p| {
                !p.reports.contains_key(&agent.agent_id)
                    && labels::satisfies(&agent.labels, &p.required)
            })
            .map(|p| pb::PreheatOrder {
                preheat_id: p.base.preheat_id.clone(),
                plugin_id: p.base.plugin_id.clone(),
                version: p.base.version.clone(),
                sha256: p.base.sha256.clone(),
                pin_seconds: ((p.base.expires_at - now).max(0) as u64).div_ceil(1000),
            })
            .collect()
    }

    /// Records an agent's reports; reports on preheats that ended are ignored.
    pub(crate) fn record(
        &mut self,
        agent_id: &str,
        reports: &[pb::PreheatReport],
    ) -> Result<(), Status> {
        if reports.len() > MAX_REPORTS {
            return Err(Status::invalid_argument(format!(
                "{} preheat reports: at most {MAX_REPORTS}",
                reports.len()
            )));
        }
        for r in reports {
            let state = r.state();
            if !matches!(
                state,
                pb::PreheatState::Fetching | pb::PreheatState::Done | pb::PreheatState::Failed
            ) {
                return Err(Status::invalid_argument(format!(
                    "preheat report {:?}: state must be FETCHING, DONE or FAILED",
                    shown(&r.preheat_id)
                )));
            }
            let Some(p) = self
                .list
                .iter_mut()
                .find(|p| p.base.preheat_id == r.preheat_id)
            else {
                continue;
            };
            let finished = p.reports.get(agent_id).is_some_and(|old| {
                old.state != pb::PreheatState::Fetching && state == pb::PreheatState::Fetching
            });
            if finished {
                continue;
            }
            let mut error = r.error.clone();
            if error.len() > MAX_ERROR_BYTES {
                let mut cut = MAX_ERROR_BYTES;
                while !error.is_char_boundary(cut) {
                    cut -= 1;
                }
                error.truncate(cut);
            }
            p.reports.insert(
                agent_id.to_owned(),
                Report {
                    state,
                    error,
                    peer_bytes: r.peer_bytes,
                    coordinator_bytes: r.coordinator_bytes,
                },
            );
        }
        Ok(())
    }

    /// Forgets what `agent_id` reported (it re-registered or was removed): a restarted
    /// agent lost its pins, so it is told again.
    pub(crate) fn forget_agent(&mut self, agent_id: &str) {
        for p in &mut self.list {
            p.reports.remove(agent_id);
        }
    }

    fn get(&self, id: &str, now: i64) -> Option<Preheat> {
        self.list
            .iter()
            .find(|p| p.base.preheat_id == id && p.base.expires_at > now)
            .cloned()
    }
}

/// `required` joined with `more`; a key with two values is refused (no agent matches).
fn join_labels(mut required: Labels, more: &Labels) -> Result<Labels, Status> {
    for (k, v) in more {
        match required.get(k) {
            Some(old) if old != v => {
                return Err(Status::invalid_argument(format!(
                    "label {k}={old} conflicts with the plugin's allowed label {k}={v}: no agent could match and get it"
                )));
            }
            _ => {
                required.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(required)
}

impl Shared {
    /// `PluginAdmin.PreheatPlugin`.
    pub(crate) async fn preheat_plugin(
        &self,
        req: pb::PreheatPluginRequest,
    ) -> Result<pb::PreheatStatus, Status> {
        let wanted = PluginSelector::new(&req.plugin_id, &req.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resolved: PluginRef = super::jobs::resolve(self, &wanted).await?;
        let plugin = self.plugin(&resolved.key()).await?;
        if !plugin.enabled {
            return Err(Status::failed_precondition(format!(
                "plugin {} is disabled: enable it before preheating it",
                resolved.key()
            )));
        }
        let chosen = labels::from_proto(&req.labels)
            .map_err(|e| Status::invalid_argument(format!("labels: {e}")))?;
        let required = join_labels(chosen.clone(), &allowed_labels(&plugin))?;
        let pin = if req.pin_seconds == 0 {
            self.config.raw.plugin.preheat_pin.get()
        } else {
            let pin = std::time::Duration::from_secs(req.pin_seconds);
            if pin > MAX_PREHEAT_PIN {
                return Err(Status::invalid_argument(format!(
                    "pin_seconds {} is longer than 30 days",
                    req.pin_seconds
                )));
            }
            pin
        };
        let mut raw = [0u8; 6];
        rand::rng().fill_bytes(&mut raw);
        let now = now_ms();
        let base = pb::PreheatStatus {
            preheat_id: format!("ph-{}", hex::encode(raw)),
            plugin_id: plugin.plugin_id.clone(),
            version: plugin.version.clone(),
            requested: wanted.selector.to_string(),
            sha256: plugin.sha256.clone(),
            size: plugin.size,
            labels: labels::to_proto(&chosen),
            created_at: now,
            expires_at: now.saturating_add(pin.as_millis() as i64),
            ..Default::default()
        };
        let preheat = Preheat {
            base,
            required,
            reports: HashMap::new(),
        };
        let max = self.config.raw.plugin.max_preheats as usize;
        self.preheats
            .lock()
            .expect("preheat lock")
            .add(preheat.clone(), max, now)?;
        let status = self.preheat_status(preheat, now);
        tracing::info!(
            preheat = %status.preheat_id,
            plugin = %resolved,
            labels = ?chosen,
            pin_s = pin.as_secs(),
            agents = status.total,
            "preheat started"
        );
        Ok(status)
    }

    /// `PluginAdmin.GetPreheat`.
    pub(crate) fn get_preheat(&self, id: &str) -> Result<pb::PreheatStatus, Status> {
        let now = now_ms();
        let preheat = self
            .preheats
            .lock()
            .expect("preheat lock")
            .get(id, now)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no active preheat {:?} (preheats end when their pin time ends, and when the coordinator restarts)",
                    shown(id)
                ))
            })?;
        Ok(self.preheat_status(preheat, now))
    }

    /// Counts and unfinished targets of `preheat`: the matching agents online now and
    /// every agent that reported.
    fn preheat_status(&self, preheat: Preheat, now: i64) -> pb::PreheatStatus {
        let Preheat {
            mut base,
            required,
            reports,
        } = preheat;
        let mut unfinished = Vec::new();
        let fleet = self.fleet.lock().expect("fleet lock");
        for (id, live) in &fleet.agents {
            let report = reports.get(id);
            let counted = report.is_some()
                || (self.online(live, now) && labels::satisfies(&live.record.labels, &required));
            if !counted {
                continue;
            }
            base.total += 1;
            let state = report.map_or(pb::PreheatState::Pending, |r| r.state);
            match state {
                pb::PreheatState::Done => base.done += 1,
                pb::PreheatState::Failed => base.failed += 1,
                pb::PreheatState::Fetching => base.fetching += 1,
                _ => base.pending += 1,
            }
            if let Some(r) = report {
                base.peer_bytes += r.peer_bytes;
                base.coordinator_bytes += r.coordinator_bytes;
            }
            if state != pb::PreheatState::Done {
                unfinished.push(pb::PreheatTarget {
                    agent_id: id.clone(),
                    state: state as i32,
                    error: report.map(|r| r.error.clone()).unwrap_or_default(),
                    peer_bytes: report.map_or(0, |r| r.peer_bytes),
                    coordinator_bytes: report.map_or(0, |r| r.coordinator_bytes),
                });
            }
        }
        drop(fleet);
        // Failed first, then by id.
        unfinished.sort_by(|a, b| {
            (a.state != pb::PreheatState::Failed as i32, &a.agent_id)
                .cmp(&(b.state != pb::PreheatState::Failed as i32, &b.agent_id))
        });
        unfinished.truncate(MAX_LISTED);
        base.unfinished = unfinished;
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, labels: &[(&str, &str)]) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn preheat(id: &str, sha: &str, required: &[(&str, &str)], expires_at: i64) -> Preheat {
        Preheat {
            base: pb::PreheatStatus {
                preheat_id: id.into(),
                plugin_id: "p".into(),
                version: "1.0.0".into(),
                sha256: sha.into(),
                expires_at,
                ..Default::default()
            },
            required: agent("", required).labels,
            reports: HashMap::new(),
        }
    }

    fn report(id: &str, state: pb::PreheatState) -> pb::PreheatReport {
        pb::PreheatReport {
            preheat_id: id.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn orders_go_to_matching_agents_until_they_report() {
        let mut book = PreheatBook::default();
        book.add(preheat("ph-1", "aa", &[("zone", "eu")], 10_000), 4, 0)
            .unwrap();
        let eu = agent("eu-1", &[("zone", "eu"), ("os", "linux")]);
        let us = agent("us-1", &[("zone", "us")]);
        let orders = book.orders_for(&eu, 1_000);
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].pin_seconds, 9);
        assert!(book.orders_for(&us, 1_000).is_empty());
        book.record("eu-1", &[report("ph-1", pb::PreheatState::Fetching)])
            .unwrap();
        assert!(book.orders_for(&eu, 1_000).is_empty());
        // A restarted agent is told again.
        book.forget_agent("eu-1");
        assert_eq!(book.orders_for(&eu, 1_000).len(), 1);
        // Expired preheats order nothing.
        assert!(book.orders_for(&eu, 10_000).is_empty());
    }

    #[test]
    fn reports_are_checked_and_never_undo_a_result() {
        let mut book = PreheatBook::default();
        book.add(preheat("ph-1", "aa", &[], 10_000), 4, 0).unwrap();
        let bad = report("ph-1", pb::PreheatState::Pending);
        assert_eq!(
            book.record("a", &[bad]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let too_many = vec![report("ph-1", pb::PreheatState::Done); MAX_REPORTS + 1];
        assert!(book.record("a", &too_many).is_err());
        book.record(
            "a",
            &[
                report("ph-1", pb::PreheatState::Done),
                report("ph-1", pb::PreheatState::Fetching),
                report("ph-gone", pb::PreheatState::Done),
            ],
        )
        .unwrap();
        let p = book.get("ph-1", 0).unwrap();
        assert_eq!(p.reports["a"].state, pb::PreheatState::Done);
    }

    #[test]
    fn the_book_is_bounded_and_same_content_replaces() {
        let mut book = PreheatBook::default();
        book.add(preheat("ph-1", "aa", &[], 10_000), 2, 0).unwrap();
        book.add(preheat("ph-2", "bb", &[], 10_000), 2, 0).unwrap();
        let full = book
            .add(preheat("ph-3", "cc", &[], 10_000), 2, 0)
            .unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        // The same content and labels replace the older preheat.
        book.add(preheat("ph-4", "aa", &[], 20_000), 2, 0).unwrap();
        assert!(book.get("ph-1", 0).is_none());
        assert!(book.get("ph-4", 0).is_some());
        // Expired ones make room.
        book.add(preheat("ph-5", "cc", &[], 30_000), 2, 15_000)
            .unwrap();
        assert!(book.get("ph-2", 15_000).is_none());
    }

    #[test]
    fn conflicting_labels_are_refused() {
        let chosen = agent("", &[("zone", "eu")]).labels;
        let allowed = agent("", &[("zone", "us")]).labels;
        assert!(join_labels(chosen.clone(), &allowed).is_err());
        let more = agent("", &[("env", "prod")]).labels;
        assert_eq!(join_labels(chosen, &more).unwrap().len(), 2);
    }
}
