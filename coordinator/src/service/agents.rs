//! `Agent`: what agents call — register, heartbeat, long-poll for jobs, report results,
//! manifests and the plugin list (`DownloadPlugin` is in `downloads.rs`, the long-poll's
//! hand-out in `long_poll.rs`, what agents are told about plugins in
//! `agent_plugins.rs`).
//!
//! Costs per call are bounded by the calling agent's own state: a heartbeat touches only
//! memory (its installed list is written when it changes); a `FetchJob` takes a job from
//! the in-memory dispatch or waits to be handed one, and a lease is one store write.

use std::time::Duration;

use arcade_p2p::labels;
use arcade_p2p::{ContentId, PluginRef};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_server::Agent;
use rand::RngCore as _;
use tonic::{Request, Response, Status};

use super::downloads::{self, DownloadStream};
use super::{Shared, SharedRef, keep_tail, now_ms, shown, token_hash};
use crate::store::{AgentRecord, Installed, JobOutcome};

/// Most plugin results in one job report, and the largest `result` of one (agents learn
/// both at registration).
const MAX_PLUGIN_RESULTS: usize = 1024;
const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Longest agent id.
pub(crate) const MAX_AGENT_ID: usize = 128;

/// The `Agent` service.
pub(crate) struct AgentService(pub(crate) SharedRef);

pub(crate) fn check_agent_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= MAX_AGENT_ID
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "agent_id {:?} is invalid: 1-{MAX_AGENT_ID} characters of [A-Za-z0-9._-], starting with a letter or digit",
            shown(id)
        )))
    }
}

fn installed_from_proto(
    list: &[pb::InstalledPlugin],
    max: usize,
) -> Result<Vec<Installed>, Status> {
    if list.len() > max {
        return Err(Status::invalid_argument(format!(
            "{} installed plugins declared: at most {max} (agents.max_installed)",
            list.len()
        )));
    }
    list.iter()
        .map(|p| {
            let r = PluginRef::new(&p.plugin_id, &p.version)
                .map_err(|e| Status::invalid_argument(format!("installed_plugins: {e}")))?;
            let sha: ContentId = p
                .sha256
                .parse()
                .map_err(|e| Status::invalid_argument(format!("installed_plugins {r}: {e}")))?;
            Ok(Installed {
                plugin_id: r.id.to_string(),
                version: r.version.to_string(),
                sha256: sha.to_hex(),
            })
        })
        .collect()
}

pub(crate) fn installed_to_proto(list: &[Installed]) -> Vec<pb::InstalledPlugin> {
    list.iter()
        .map(|i| pb::InstalledPlugin {
            plugin_id: i.plugin_id.clone(),
            version: i.version.clone(),
            sha256: i.sha256.clone(),
        })
        .collect()
}

fn stage_names() -> [pb::Stage; 4] {
    [
        pb::Stage::Before,
        pb::Stage::OnSuccess,
        pb::Stage::OnFailure,
        pb::Stage::After,
    ]
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let s = &self.0;
        let enroller = s.require_enrollment(&request)?;
        if let Err(wait) = s.registrations.try_take() {
            let mut status = Status::resource_exhausted(format!(
                "more than agents.register_rate = {} registrations per second; retry shortly",
                s.config.raw.agents.register_rate
            ));
            status.metadata_mut().insert(
                "arcade-retry-after-ms",
                tonic::metadata::MetadataValue::from(wait.as_millis().max(1) as u32),
            );
            return Err(status);
        }
        let req = request.into_inner();
        check_agent_id(&req.agent_id)?;
        let declared = labels::from_proto(&req.labels)
            .map_err(|e| Status::invalid_argument(format!("labels: {e}")))?;
        let installed = installed_from_proto(
            &req.installed_plugins,
            s.config.raw.agents.max_installed as usize,
        )?;
        if req.hostname.len() > 256 || req.peer_id.len() > 128 || req.agent_version.len() > 64 {
            return Err(Status::invalid_argument(
                "hostname (256), peer_id (128) or agent_version (64) is too long",
            ));
        }
        if req.addrs.len() > 32 || req.addrs.iter().any(|a| a.len() > 256) {
            return Err(Status::invalid_argument(
                "at most 32 addrs of at most 256 bytes each",
            ));
        }
        let existing = {
            let fleet = s.fleet.lock().expect("fleet lock");
            let max = s.config.raw.agents.max_agents as usize;
            let existing = fleet.agents.get(&req.agent_id).map(|l| l.record.clone());
            if existing.is_none() && fleet.len() >= max {
                return Err(Status::resource_exhausted(format!(
                    "{max} agents are registered (agents.max_agents): remove departed agents with `arcadectl agent remove ID` or raise the limit"
                )));
            }
            existing
        };
        let admission = s.admit_registration(&enroller, &req, declared, existing.as_deref())?;
        if let Some(grant) = &admission.count_use {
            let updated = s.store.use_enroll_grant(grant, now_ms()).await?;
            s.identity.put_grant(updated);
        }
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let record = AgentRecord {
            agent_id: req.agent_id.clone(),
            hostname: req.hostname,
            labels: admission.labels,
            peer_id: req.peer_id,
            addrs: req.addrs,
            agent_version: req.agent_version,
            installed,
            registered_at: now_ms(),
            token_hash: token_hash(&token),
            key_id: admission.key_id,
            proof_at: req.signed_at_ms,
            granted: admission.granted,
        };
        let (mesh_ticket, ticket_expires_at) = s.issue_ticket(&record)?;
        s.store.put_agent(record.clone()).await?;
        {
            let mut fleet = s.fleet.lock().expect("fleet lock");
            fleet.insert(record.clone(), now_ms());
            if let Some(live) = fleet.agents.get_mut(&record.agent_id) {
                live.ticket_expires_at = ticket_expires_at;
            }
        }
        // A restarted agent lost its preheat pins: it is told again.
        s.preheats
            .lock()
            .expect("preheat lock")
            .forget_agent(&record.agent_id);
        s.metrics.registrations.inc();
        tracing::info!(agent = %record.agent_id, labels = ?record.labels, installed = record.installed.len(), "agent registered");
        let jobs = &s.config.raw.jobs;
        Ok(Response::new(pb::RegisterResponse {
            agent_token: token,
            heartbeat_interval_seconds: jobs.heartbeat_interval.get().as_secs().max(1) as u32,
            lease_ttl_seconds: jobs.lease_ttl.get().as_secs().max(1) as u32,
            mesh_ticket,
            mesh_public_key: s.tickets.public_key(),
            max_plugin_results: MAX_PLUGIN_RESULTS as u32,
            max_result_bytes: MAX_RESULT_BYTES as u32,
            max_output_tail_bytes: s.config.raw.jobs.max_output_tail.bytes() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        if req.installed_set {
            let installed = installed_from_proto(
                &req.installed_plugins,
                s.config.raw.agents.max_installed as usize,
            )?;
            // Written only when it changed (liveness itself is never written), and to the
            // store before memory, so a failed write is retried by the next heartbeat.
            let changed = s
                .with_live(&agent.agent_id, |l| l.record.installed != installed)
                .unwrap_or(false);
            if changed {
                s.store
                    .set_installed(&agent.agent_id, installed.clone())
                    .await?;
                s.fleet
                    .lock()
                    .expect("fleet lock")
                    .set_installed(&agent.agent_id, installed);
            }
        }
        let fetching: Vec<String> = req
            .fetching
            .iter()
            .filter(|sha| sha.parse::<arcade_p2p::ContentId>().is_ok())
            .take(super::fleet::MAX_FETCHING)
            .cloned()
            .collect();
        let extended = s.extend_leases(&agent.agent_id, &req.running_jobs, &req.job_progress);
        let preheat = {
            let mut book = s.preheats.lock().expect("preheat lock");
            book.record(&agent.agent_id, &req.preheat_reports)?;
            book.orders_for(&agent, now_ms())
        };
        // Record what it is fetching (`GetFleetStatus`) and renew the mesh ticket once
        // half of its lifetime has passed, under one lock of the fleet.
        let half = s.config.raw.mesh.ticket_ttl.get().as_millis() as i64 / 2;
        let due = s
            .with_live(&agent.agent_id, |a| {
                a.fetching = fetching;
                a.ticket_expires_at - now_ms() < half
            })
            .unwrap_or(false);
        let mut mesh_ticket = Vec::new();
        if due {
            let (ticket, expires) = s.issue_ticket(&agent)?;
            s.with_live(&agent.agent_id, |l| l.ticket_expires_at = expires);
            mesh_ticket = ticket;
        }
        let (revoked_peers, revocations_upto) =
            s.identity.revocations_since(req.revocations_seen, now_ms());
        Ok(Response::new(pb::HeartbeatResponse {
            revoked_jobs: extended.revoked,
            mesh_ticket,
            cancelled_jobs: extended.cancelled,
            revoked_peers,
            revocations_upto,
            preheat,
        }))
    }

    async fn fetch_job(
        &self,
        request: Request<pb::FetchJobRequest>,
    ) -> Result<Response<pb::FetchJobResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let labels = s
            .with_live(&agent.agent_id, |l| l.labels.clone())
            .ok_or_else(|| Status::unauthenticated("unknown agent: Register again"))?;
        let req = request.into_inner();
        let max = req.max_jobs.clamp(1, 64) as usize;
        let wait = Duration::from_secs(u64::from(req.wait_seconds))
            .min(s.config.raw.jobs.long_poll_max.get());
        let deadline = tokio::time::Instant::now() + wait;
        let leased = s.lease_for(&agent, labels, max, deadline).await?;
        let mut jobs = Vec::with_capacity(leased.len());
        for detail in leased {
            jobs.push(s.job_for_agent(&agent, detail).await?);
        }
        Ok(Response::new(pb::FetchJobResponse { jobs }))
    }

    async fn report_job_result(
        &self,
        request: Request<pb::ReportJobResultRequest>,
    ) -> Result<Response<pb::ReportJobResultResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        let status = req.status();
        if !matches!(
            status,
            pb::JobStatus::Succeeded | pb::JobStatus::Failed | pb::JobStatus::Cancelled
        ) {
            return Err(Status::invalid_argument(
                "status must be SUCCEEDED, FAILED or CANCELLED",
            ));
        }
        if req.plugin_results.len() > MAX_PLUGIN_RESULTS
            || req
                .plugin_results
                .iter()
                .any(|r| r.result.len() > MAX_RESULT_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PLUGIN_RESULTS} plugin results, each result at most {MAX_RESULT_BYTES} bytes"
            )));
        }
        let tail_max = s.config.raw.jobs.max_output_tail.bytes() as usize;
        let outcome = JobOutcome {
            status,
            exit_code: req.exit_code,
            output_tail: keep_tail(&req.output_tail, tail_max),
            error_message: keep_tail(&req.error_message, 4096),
            plugin_results: req.plugin_results,
            started_at: req.started_at,
            finished_at: if req.finished_at > 0 {
                req.finished_at
            } else {
                now_ms()
            },
        };
        let job = s
            .store
            .complete_job(&agent.agent_id, &req.job_id, outcome)
            .await?;
        s.leases.lock().expect("lease lock").end(&req.job_id);
        let label = match job.status() {
            pb::JobStatus::Succeeded => "succeeded",
            pb::JobStatus::Cancelled => "cancelled",
            _ => "failed",
        };
        s.count_finished(label);
        tracing::info!(job = %job.job_id, agent = %agent.agent_id, status = label, "job finished");
        Ok(Response::new(pb::ReportJobResultResponse {}))
    }

    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        let (plugin, manifest) = s
            .resolve_for_agent(&agent, &req.plugin_id, &req.version, &req.sha256)
            .await?;
        let hints = s.peer_hints(&agent, &plugin);
        let all = stage_names().iter().map(|s| *s as i32).collect();
        let mut info = s.plugin_info(&plugin, &manifest, all, hints);
        if req.sha256.is_empty() {
            info.patches = s.patch_offers(&plugin).await?;
        }
        Ok(Response::new(pb::GetManifestResponse {
            manifest: Some(manifest.to_proto()),
            plugin: Some(info),
        }))
    }

    async fn list_available_plugins(
        &self,
        request: Request<pb::ListAvailablePluginsRequest>,
    ) -> Result<Response<pb::ListAvailablePluginsResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let t = request.into_inner().plugin_type;
        let listed = s.store.list_plugins(&t).await?;
        let mut plugins = Vec::new();
        for p in listed {
            if !p.enabled || Shared::check_acl(&agent, &p).is_err() {
                continue;
            }
            plugins.push(pb::PluginInfo {
                plugin_id: p.plugin_id.clone(),
                name: p.name.clone(),
                version: p.version.clone(),
                checksum: p.sha256.clone(),
                size: p.size as i64,
                location: pb::PluginLocation::Server as i32,
                plugin_type: p.plugin_type.clone(),
                ..Default::default()
            });
        }
        Ok(Response::new(pb::ListAvailablePluginsResponse { plugins }))
    }

    type DownloadPluginStream = DownloadStream;

    async fn download_plugin(
        &self,
        request: Request<pb::DownloadPluginRequest>,
    ) -> Result<Response<Self::DownloadPluginStream>, Status> {
        downloads::download_plugin(&self.0, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(check_agent_id("agent-1.eu_2").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_agent_id(bad).is_err(), "{bad}");
        }
    }
}
