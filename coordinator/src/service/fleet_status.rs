//! `Fleet.GetFleetStatus`: one snapshot of what the fleet is doing, from memory only —
//! agents online and offline by label (online: seen within three heartbeat intervals),
//! jobs queued and running, and per plugin version the online agents holding it, the
//! agents that said they are fetching it (heartbeats) and those the coordinator is
//! serving chunks of it now (`fetches.rs`).

use std::collections::{BTreeMap, HashMap};

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use tonic::Status;

use super::{SharedRef, now_ms};

/// Builds the snapshot.
pub(crate) async fn fleet_status(s: &SharedRef) -> Result<pb::FleetStatus, Status> {
    let now = now_ms();
    let mut out = pb::FleetStatus::default();
    let mut labels: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
    // sha → (plugin_id, version, holders, fetching)
    let mut plugins: HashMap<String, pb::PluginStatus> = HashMap::new();
    {
        let fleet = s.fleet.lock().expect("fleet lock");
        for live in fleet.agents.values() {
            let online = s.online(live, now);
            if online {
                out.agents_online += 1;
            } else {
                out.agents_offline += 1;
            }
            for (k, v) in live.record.labels.iter() {
                let e = labels.entry((k.clone(), v.clone())).or_default();
                if online {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
            if !online {
                continue;
            }
            for p in &live.record.installed {
                let e = plugins
                    .entry(p.sha256.clone())
                    .or_insert_with(|| pb::PluginStatus {
                        plugin_id: p.plugin_id.clone(),
                        version: p.version.clone(),
                        sha256: p.sha256.clone(),
                        ..Default::default()
                    });
                e.holders += 1;
            }
            for sha in &live.fetching {
                plugins
                    .entry(sha.clone())
                    .or_insert_with(|| pb::PluginStatus {
                        sha256: sha.clone(),
                        ..Default::default()
                    })
                    .fetching += 1;
            }
        }
    }
    out.labels = labels
        .into_iter()
        .map(|((key, value), (online, offline))| pb::LabelStatus {
            key,
            value,
            online,
            offline,
        })
        .collect();
    out.jobs_queued = s.dispatch.lock().expect("dispatch lock").queued() as u32;
    out.jobs_running = s.leases.lock().expect("lease lock").running() as u32;
    let in_flight = s.fetches.lock().expect("fetches lock").in_flight();
    for f in in_flight {
        let e = plugins
            .entry(f.content.to_hex())
            .or_insert_with(|| pb::PluginStatus {
                sha256: f.content.to_hex(),
                ..Default::default()
            });
        if e.plugin_id.is_empty() {
            e.plugin_id = f.plugin_id;
            e.version = f.version;
        }
        e.from_coordinator += f.agents;
        e.coordinator_bytes += f.bytes;
    }
    // Contents known only by their SHA-256 (fetched, held by nobody yet): name them.
    for p in plugins.values_mut().filter(|p| p.plugin_id.is_empty()) {
        if let Ok(id) = p.sha256.parse::<ContentId>() {
            if let Some(v) = s.store.plugins_with_content(id).await?.first() {
                p.plugin_id = v.plugin_id.clone();
                p.version = v.version.clone();
            }
        }
    }
    let mut list: Vec<pb::PluginStatus> = plugins.into_values().collect();
    list.sort_by(|a, b| {
        b.holders
            .cmp(&a.holders)
            .then(b.fetching.cmp(&a.fetching))
            .then(a.plugin_id.cmp(&b.plugin_id))
            .then(a.version.cmp(&b.version))
    });
    out.plugins = list;
    Ok(out)
}
