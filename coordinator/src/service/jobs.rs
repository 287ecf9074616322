//! `Jobs`: create, get, list and cancel jobs (admin token).

use std::collections::HashSet;

use arcade_p2p::labels;
use arcade_p2p::{PluginRef, PluginSelector, VersionSelector};
use arcade_proto::v1 as pb;
use arcade_proto::v1::jobs_server::Jobs;
use tonic::{Request, Response, Status};

use super::{SharedRef, allowed_labels, now_ms};
use crate::dispatch::Need;
use crate::store::CancelOutcome;

const MAX_COMMANDS: usize = 256;
const MAX_COMMAND_BYTES: usize = 64 * 1024;
const MAX_PARAMETERS: usize = 256;
const MAX_PARAMETER_BYTES: usize = 16 * 1024;
const MAX_REQUIRED_PLUGINS: usize = 64;
const MAX_TIMEOUT_SECONDS: u32 = 7 * 86_400;

/// The `Jobs` service.
pub(crate) struct JobsService(pub(crate) SharedRef);

/// Turns a stage list into the stored form: empty means all four; duplicates and
/// `STAGE_UNSPECIFIED` are rejected.
/// The version a job gets for `wanted`: itself when exact (its enabled state is
/// checked by the caller, as before selectors), else the highest enabled version the
/// selector accepts.
pub(super) async fn resolve(
    s: &super::Shared,
    wanted: &PluginSelector,
) -> Result<PluginRef, Status> {
    if let VersionSelector::Exact(version) = &wanted.selector {
        return Ok(PluginRef {
            id: wanted.id.clone(),
            version: version.clone(),
        });
    }
    let versions = s.store.versions_of(wanted.id.as_str()).await?;
    if versions.is_empty() {
        return Err(Status::not_found(format!(
            "plugin {} has no versions",
            wanted.id
        )));
    }
    let enabled: Vec<semver::Version> = versions
        .iter()
        .filter(|p| p.enabled)
        .filter_map(|p| p.version.parse().ok())
        .collect();
    match wanted.selector.pick(&enabled) {
        Some(v) => Ok(PluginRef {
            id: wanted.id.clone(),
            version: v.clone(),
        }),
        None => {
            let mut shown: Vec<&semver::Version> = enabled.iter().collect();
            shown.sort();
            let shown: Vec<String> = shown.iter().rev().take(10).map(|v| v.to_string()).collect();
            Err(Status::failed_precondition(format!(
                "no enabled version of {} matches {} (enabled, newest first: {}); push or enable a matching version, or name another",
                wanted.id,
                wanted.selector,
                if shown.is_empty() {
                    "none".to_owned()
                } else {
                    shown.join(", ")
                }
            )))
        }
    }
}

fn normalise_stages(key: &str, stages: &[i32]) -> Result<Vec<i32>, Status> {
    if stages.is_empty() {
        return Ok(vec![
            pb::Stage::Before as i32,
            pb::Stage::OnSuccess as i32,
            pb::Stage::OnFailure as i32,
            pb::Stage::After as i32,
        ]);
    }
    let mut seen = HashSet::new();
    for &s in stages {
        match pb::Stage::try_from(s) {
            Ok(pb::Stage::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "plugin {key}: stage {s} is not one of before, on_success, on_failure, after"
                )));
            }
            Ok(_) => {}
        }
        if !seen.insert(s) {
            return Err(Status::invalid_argument(format!(
                "plugin {key}: stage listed twice"
            )));
        }
    }
    Ok(stages.to_vec())
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let req = request.into_inner();
        if req.commands.is_empty() && req.required_plugins.is_empty() {
            return Err(Status::invalid_argument(
                "a job needs at least one command or plugin",
            ));
        }
        if req.commands.len() > MAX_COMMANDS
            || req.commands.iter().any(|c| c.len() > MAX_COMMAND_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_COMMANDS} commands of at most {MAX_COMMAND_BYTES} bytes each"
            )));
        }
        if req.name.len() > 256 {
            return Err(Status::invalid_argument(
                "job name must be at most 256 bytes",
            ));
        }
        if req.parameters.len() > MAX_PARAMETERS
            || req
                .parameters
                .iter()
                .any(|(k, v)| k.len() + v.len() > MAX_PARAMETER_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PARAMETERS} parameters of at most {MAX_PARAMETER_BYTES} bytes each"
            )));
        }
        if req.timeout_seconds > MAX_TIMEOUT_SECONDS {
            return Err(Status::invalid_argument(format!(
                "timeout_seconds must be at most {MAX_TIMEOUT_SECONDS}"
            )));
        }
        let selector = labels::from_proto(&req.label_selector)
            .map_err(|e| Status::invalid_argument(format!("label_selector: {e}")))?;
        if req.required_plugins.len() > MAX_REQUIRED_PLUGINS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REQUIRED_PLUGINS} required plugins"
            )));
        }
        let mut seen = HashSet::new();
        let mut acls = Vec::with_capacity(req.required_plugins.len());
        let mut required = Vec::with_capacity(req.required_plugins.len());
        for rp in &req.required_plugins {
            let wanted = PluginSelector::new(&rp.plugin_id, &rp.version)
                .map_err(|e| Status::invalid_argument(format!("required_plugins: {e}")))?;
            let r = resolve(s, &wanted).await?;
            let key = r.key();
            if !seen.insert(key.clone()) {
                return Err(Status::invalid_argument(format!(
                    "plugin {key} is required twice"
                )));
            }
            let plugin = s.plugin(&key).await?;
            if !plugin.enabled {
                return Err(Status::failed_precondition(format!(
                    "plugin {key} is disabled; enable it or use another version"
                )));
            }
            acls.push(allowed_labels(&plugin));
            required.push(pb::RequiredPlugin {
                plugin_id: r.id.to_string(),
                version: r.version.to_string(),
                stages: normalise_stages(&key, &rp.stages)?,
                requested: if wanted.selector.is_exact() {
                    String::new()
                } else {
                    wanted.selector.to_string()
                },
            });
        }
        let job = pb::JobDetail {
            job_id: uuid::Uuid::now_v7().to_string(),
            name: req.name,
            status: pb::JobStatus::Queued as i32,
            commands: req.commands,
            parameters: req.parameters,
            label_selector: labels::to_proto(&selector),
            timeout_seconds: req.timeout_seconds,
            required_plugins: required,
            created_at: now_ms(),
            ..Default::default()
        };
        let need = Need::new(&selector, acls.iter());
        // Durable as queued before it is acknowledged or handed to an agent.
        s.store.create_job(job.clone()).await?;
        s.metrics.jobs_created.inc();
        s.enqueue(job.job_id.clone(), need);
        tracing::info!(job = %job.job_id, plugins = job.required_plugins.len(), "job created");
        Ok(Response::new(pb::CreateJobResponse { job_id: job.job_id }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        self.0.require_admin(&request)?;
        let id = request.into_inner().job_id;
        if id.is_empty() || id.len() > 64 {
            return Err(Status::invalid_argument("job_id must be 1-64 characters"));
        }
        let s = &self.0;
        let mut job = s
            .store
            .get_job(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
        if job.status() == pb::JobStatus::Queued {
            if let Ok(need) = s.need_of(&job).await {
                job.waiting_reason = s
                    .fleet
                    .lock()
                    .expect("fleet lock")
                    .unrunnable_reason(&need)
                    .unwrap_or_default();
            }
        }
        if job.status() == pb::JobStatus::Running {
            job.progress = s
                .leases
                .lock()
                .expect("lease lock")
                .get(&id)
                .and_then(|l| l.progress.clone());
        }
        Ok(Response::new(pb::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.0.require_admin(&request)?;
        let req = request.into_inner();
        let status = pb::JobStatus::try_from(req.status)
            .map_err(|_| Status::invalid_argument(format!("unknown job status {}", req.status)))?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let jobs = self.0.store.list_jobs(status, limit).await?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let id = request.into_inner().job_id;
        if id.is_empty() || id.len() > 64 {
            return Err(Status::invalid_argument("job_id must be 1-64 characters"));
        }
        // Out of the in-memory queue first, so no agent is handed it; the store decides
        // (a claim that got there first makes it a running job's cancel).
        let was_queued = {
            let mut d = s.dispatch.lock().expect("dispatch lock");
            let removed = d.remove(&id);
            s.sync_dispatch_gauges(&d);
            removed
        };
        let outcome = match s.store.cancel_job(&id, now_ms()).await {
            Ok(o) => o,
            Err(e) => {
                if was_queued {
                    // Not cancelled: it stays queued.
                    if let Ok(Some(job)) = s.store.get_job(&id).await {
                        if let Ok(need) = s.need_of(&job).await {
                            s.enqueue(id.clone(), need);
                        }
                    }
                }
                return Err(e.into());
            }
        };
        let already_finished = matches!(outcome, CancelOutcome::Finished(_));
        let job = match outcome {
            CancelOutcome::Cancelled(job) => {
                s.count_finished("cancelled");
                tracing::info!(job = %id, "queued job cancelled");
                job
            }
            CancelOutcome::Requested(job) => {
                s.leases.lock().expect("lease lock").request_cancel(&id);
                tracing::info!(job = %id, agent = %job.agent_id, "cancel of a running job requested");
                job
            }
            CancelOutcome::Finished(job) => job,
        };
        Ok(Response::new(pb::CancelJobResponse {
            job: Some(job),
            already_finished,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_default_to_all_and_reject_junk() {
        assert_eq!(normalise_stages("p", &[]).unwrap().len(), 4);
        assert_eq!(normalise_stages("p", &[1, 4]).unwrap(), vec![1, 4]);
        assert!(normalise_stages("p", &[0]).is_err());
        assert!(normalise_stages("p", &[9]).is_err());
        assert!(normalise_stages("p", &[1, 1]).is_err());
    }
}
