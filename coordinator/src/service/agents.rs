//! `Agent`: what agents call — register, heartbeat, long-poll for jobs, report results,
//! manifests and the plugin list (`DownloadPlugin` is in `downloads.rs`).
//!
//! Costs per call are bounded by the calling agent's own state: a heartbeat touches only
//! memory (its installed list is written when it changes); a `FetchJob` takes a job from
//! the in-memory dispatch or waits to be handed one, and a lease is one store write.

use std::sync::Arc;
use std::time::Duration;

use arcade_p2p::labels;
use arcade_p2p::{ContentId, Manifest, PluginRef};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_server::Agent;
use rand::RngCore as _;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::downloads::{self, DownloadStream};
use super::{Shared, SharedRef, keep_tail, now_ms, shown, token_hash};
use crate::dispatch::{QueuedJob, WaiterId};
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

/// A job taken from the dispatch but not yet leased in the store: given back to the
/// queue, at its old place, unless [`Reserved::leased`] is called (also when the call
/// is dropped half-way because the agent hung up).
struct Reserved<'a> {
    shared: &'a Shared,
    job: Option<QueuedJob>,
}

impl Reserved<'_> {
    fn job_id(&self) -> &str {
        self.job.as_ref().map(|j| j.job_id.as_str()).unwrap_or("")
    }

    /// The store has decided (leased, or skipped: cancelled or taken elsewhere).
    fn settled(mut self) {
        self.job = None;
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let mut d = self.shared.dispatch.lock().expect("dispatch lock");
            d.restore(job);
            self.shared.sync_dispatch_gauges(&d);
        }
    }
}

/// A waiting `FetchJob`: on drop it leaves the waiters, and a job handed to it in the
/// meantime goes back to the queue (the hand-off and this happen under the dispatch
/// lock, so a job is never lost between them).
struct Waiting<'a> {
    shared: &'a Shared,
    id: WaiterId,
    rx: Option<oneshot::Receiver<QueuedJob>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut d = self.shared.dispatch.lock().expect("dispatch lock");
        d.stop_waiting(self.id);
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(job) = rx.try_recv() {
                d.restore(job);
            }
        }
        self.shared.sync_dispatch_gauges(&d);
    }
}

impl Shared {
    pub(crate) fn plugin_info(
        &self,
        plugin: &pb::PluginVersion,
        manifest: &Manifest,
        stages: Vec<i32>,
        hints: Vec<pb::PeerHint>,
    ) -> pb::PluginInfo {
        pb::PluginInfo {
            plugin_id: plugin.plugin_id.clone(),
            name: plugin.name.clone(),
            version: plugin.version.clone(),
            checksum: plugin.sha256.clone(),
            size: plugin.size as i64,
            download_url: String::new(),
            location: pb::PluginLocation::Server as i32,
            plugin_type: plugin.plugin_type.clone(),
            stages,
            manifest: Some(manifest.to_proto()),
            peer_hints: hints,
            allowed_labels: plugin.allowed_labels.clone(),
            signer: plugin.signer.clone(),
            signature: plugin.signature.clone(),
        }
    }

    /// Resolves a plugin version or a content id for an agent, checking access.
    pub(crate) async fn resolve_for_agent(
        &self,
        agent: &AgentRecord,
        plugin_id: &str,
        version: &str,
        sha256: &str,
    ) -> Result<(pb::PluginVersion, Arc<Manifest>), Status> {
        let plugin = if !plugin_id.is_empty() {
            let r = PluginRef::new(plugin_id, version)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let p = self.plugin(&r.key()).await?;
            Self::check_acl(agent, &p)?;
            if !p.enabled {
                return Err(Status::failed_precondition(format!(
                    "plugin {} is disabled: it is no longer served; enable it or use another version",
                    r.key()
                )));
            }
            p
        } else if !sha256.is_empty() {
            let id: ContentId = sha256
                .parse()
                .map_err(|e| Status::invalid_argument(format!("sha256: {e}")))?;
            let candidates = self.store.plugins_with_content(id).await?;
            if candidates.is_empty() {
                return Err(Status::not_found(format!("no plugin has content {id}")));
            }
            let mut last = None;
            let mut found = None;
            if candidates.iter().all(|p| !p.enabled) {
                return Err(Status::failed_precondition(format!(
                    "every plugin version with content {id} is disabled: it is no longer served"
                )));
            }
            for p in candidates.into_iter().filter(|p| p.enabled) {
                match Self::check_acl(agent, &p) {
                    Ok(()) => {
                        found = Some(p);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match (found, last) {
                (Some(p), _) => p,
                (None, Some(e)) => return Err(e),
                (None, None) => {
                    return Err(Status::not_found(format!("no plugin has content {id}")));
                }
            }
        } else {
            return Err(Status::invalid_argument(
                "give plugin_id and version, or sha256",
            ));
        };
        let id: ContentId = plugin
            .sha256
            .parse()
            .map_err(|_| Status::internal("stored plugin has a bad sha256"))?;
        let manifest = self.manifest(id).await?;
        Ok((plugin, manifest))
    }

    /// Builds the agent-facing job: plugin infos with manifests and peer hints.
    async fn job_for_agent(
        &self,
        agent: &AgentRecord,
        detail: pb::JobDetail,
    ) -> Result<pb::Job, Status> {
        let mut plugins = Vec::with_capacity(detail.required_plugins.len());
        for req in &detail.required_plugins {
            let (plugin, manifest) = self
                .resolve_for_agent(agent, &req.plugin_id, &req.version, "")
                .await?;
            let hints = self.peer_hints(agent, &plugin);
            plugins.push(self.plugin_info(&plugin, &manifest, req.stages.clone(), hints));
        }
        Ok(pb::Job {
            job_id: detail.job_id,
            name: detail.name,
            commands: detail.commands,
            parameters: detail.parameters,
            timeout_seconds: detail.timeout_seconds,
            attempt: detail.attempts,
            plugins,
        })
    }
}

impl Shared {
    /// Takes up to `max` jobs for `agent` now, or waits (until `deadline`) to be handed
    /// one, then leases them in the store; empty when none came in time.
    async fn lease_for(
        &self,
        agent: &AgentRecord,
        labels: Arc<labels::Labels>,
        max: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<pb::JobDetail>, Status> {
        loop {
            let mut reserved: Vec<Reserved<'_>> = Vec::new();
            let waiting = {
                let mut d = self.dispatch.lock().expect("dispatch lock");
                while reserved.len() < max {
                    match d.take(&labels) {
                        Some(job) => reserved.push(Reserved {
                            shared: self,
                            job: Some(job),
                        }),
                        None => break,
                    }
                }
                let waiting = reserved.is_empty().then(|| {
                    let (tx, rx) = oneshot::channel();
                    Waiting {
                        shared: self,
                        id: d.wait(labels.clone(), tx),
                        rx: Some(rx),
                    }
                });
                self.sync_dispatch_gauges(&d);
                waiting
            };
            if let Some(mut waiting) = waiting {
                let rx = waiting.rx.as_mut().expect("receiver is set");
                tokio::select! {
                    handed = rx => {
                        waiting.rx = None;
                        match handed {
                            Ok(job) => reserved.push(Reserved { shared: self, job: Some(job) }),
                            Err(_) => return Ok(Vec::new()),
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                    _ = self.shutdown.cancelled() => return Ok(Vec::new()),
                }
            }
            if !self.is_current(agent) {
                // Removed or re-registered while waiting: the jobs go back (on drop).
                return Err(Status::unauthenticated(
                    "this agent was removed or registered again: Register again",
                ));
            }
            let mut leased = Vec::new();
            for r in reserved {
                let job = self
                    .store
                    .claim_job(r.job_id(), &agent.agent_id, now_ms())
                    .await?;
                r.settled();
                if let Some(job) = job {
                    self.start_lease(&agent.agent_id, &job.job_id);
                    tracing::info!(job = %job.job_id, agent = %agent.agent_id, attempt = job.attempts, "job leased");
                    leased.push(job);
                }
            }
            if !leased.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(leased);
            }
            // Every job we got had been cancelled meanwhile: wait on.
        }
    }
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
        let extended = s.extend_leases(&agent.agent_id, &req.running_jobs);
        // Renew the mesh ticket once half of its lifetime has passed.
        let half = s.config.raw.mesh.ticket_ttl.get().as_millis() as i64 / 2;
        let due = s
            .with_live(&agent.agent_id, |a| a.ticket_expires_at - now_ms() < half)
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
        Ok(Response::new(pb::GetManifestResponse {
            manifest: Some(manifest.to_proto()),
            plugin: Some(s.plugin_info(&plugin, &manifest, all, hints)),
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
