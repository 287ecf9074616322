//! `Agent` (what agents call) and `Fleet` (admin view of the agents).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arcade_p2p::labels::{self, Labels};
use arcade_p2p::{ContentId, Manifest, PluginRef};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_server::Agent;
use arcade_proto::v1::fleet_server::Fleet;
use futures::Stream;
use rand::RngCore as _;
use tonic::{Request, Response, Status};

use super::herd::Admission;
use super::{LiveAgent, Shared, SharedRef, allowed_labels, keep_tail, now_ms, shown, token_hash};
use crate::blob::BlobReader;
use crate::metrics::{DownloadLabels, PluginIdLabel, PluginVersionLabels, StatusLabel};
use crate::store::{AgentRecord, Installed, plugin_key};

/// Most peer hints sent per plugin.
const MAX_PEER_HINTS: usize = 16;
/// Of the hints, at most this many name agents still fetching the plugin.
const MAX_FETCHER_HINTS: usize = 8;
/// Agents handed a manifest this long ago are no longer hinted as fetching it.
const FETCHER_HINT_WINDOW_MS: i64 = 10 * 60 * 1000;
/// Most fetchers remembered per content (the most recent are kept).
pub(crate) const MAX_FETCHERS_REMEMBERED: usize = 256;
/// Most chunk ranges in one download request.
const MAX_RANGES: usize = 1024;
/// Most plugin results in one job report, and the largest `result` of one.
const MAX_PLUGIN_RESULTS: usize = 1024;
const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Most installed plugins an agent may declare.
const MAX_INSTALLED: usize = 10_000;

/// The `Agent` service.
pub(crate) struct AgentService(pub(crate) SharedRef);

/// The `Fleet` service.
pub(crate) struct FleetService(pub(crate) SharedRef);

fn check_agent_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "agent_id {:?} is invalid: 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit",
            shown(id)
        )))
    }
}

fn installed_from_proto(list: &[pb::InstalledPlugin]) -> Result<Vec<Installed>, Status> {
    if list.len() > MAX_INSTALLED {
        return Err(Status::invalid_argument(format!(
            "{} installed plugins declared: at most {MAX_INSTALLED}",
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

fn installed_to_proto(list: &[Installed]) -> Vec<pb::InstalledPlugin> {
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

impl Shared {
    fn online(&self, live: &LiveAgent, now: i64) -> bool {
        let window = 3 * self.config.raw.jobs.heartbeat_interval.get().as_millis() as i64;
        live.last_seen > 0 && now - live.last_seen <= window
    }

    /// Agents other than `requester` that hold `content` and may have `plugin`, same
    /// zone first, most recently seen first; then (`complete = false`, up to
    /// [`MAX_FETCHER_HINTS`]) agents handed the plugin within the last
    /// [`FETCHER_HINT_WINDOW_MS`] that do not hold it yet — they are fetching it and
    /// serve the chunks they have, so agents fetching at once also fetch from each other
    /// (with complete holders only, a fleet fetching at once took everything from the
    /// few seeds). A requester that does not hold the plugin is remembered as fetching it.
    fn peer_hints(&self, requester: &AgentRecord, plugin: &pb::PluginVersion) -> Vec<pb::PeerHint> {
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
        let holds = |a: &LiveAgent| a.record.installed.iter().any(|i| i.sha256 == plugin.sha256);
        let mut holders: Vec<&LiveAgent> = fleet
            .agents
            .values()
            .filter(|a| may_serve(a) && holds(a))
            .collect();
        holders.sort_by_key(|a| (a.record.labels.get("zone") != zone, -a.last_seen));
        holders.truncate(MAX_PEER_HINTS);
        let hint = |a: &LiveAgent, complete: bool| pb::PeerHint {
            agent_id: a.record.agent_id.clone(),
            peer_id: a.record.peer_id.clone(),
            addrs: a.record.addrs.clone(),
            complete,
            zone: a.record.labels.get("zone").cloned().unwrap_or_default(),
        };
        let mut hints: Vec<pb::PeerHint> = holders.iter().map(|a| hint(a, true)).collect();
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
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut h = DefaultHasher::new();
            requester.agent_id.hash(&mut h);
            let start = (h.finish() % fetchers.len() as u64) as usize;
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

    fn plugin_info(
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
        }
    }

    /// Resolves a plugin version or a content id for an agent, checking access.
    async fn resolve_for_agent(
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
            p
        } else if !sha256.is_empty() {
            let id: ContentId = sha256
                .parse()
                .map_err(|e| Status::invalid_argument(format!("sha256: {e}")))?;
            let candidates = self
                .store
                .call(move |s| s.plugins_with_content(&id))
                .await?;
            if candidates.is_empty() {
                return Err(Status::not_found(format!("no plugin has content {id}")));
            }
            let mut last = None;
            let mut found = None;
            for p in candidates {
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

    /// Leases jobs the agent may run (label selector and plugin access checked).
    async fn try_lease(
        &self,
        agent: &AgentRecord,
        max: usize,
    ) -> Result<Vec<pb::JobDetail>, Status> {
        let a = agent.clone();
        let jobs = self
            .store
            .call(move |s| {
                let acl: std::collections::HashMap<String, Labels> = s
                    .list_plugins("")?
                    .into_iter()
                    .map(|p| (plugin_key(&p.plugin_id, &p.version), allowed_labels(&p)))
                    .collect();
                s.lease_jobs(&a.agent_id, max, now_ms(), |job| {
                    let selector: Labels = job
                        .label_selector
                        .iter()
                        .map(|l| (l.key.clone(), l.value.clone()))
                        .collect();
                    labels::satisfies(&a.labels, &selector)
                        && job.required_plugins.iter().all(|r| {
                            acl.get(&plugin_key(&r.plugin_id, &r.version))
                                .is_some_and(|req| labels::satisfies(&a.labels, req))
                        })
                })
            })
            .await?;
        self.start_leases(&agent.agent_id, &jobs);
        for j in &jobs {
            tracing::info!(job = %j.job_id, agent = %agent.agent_id, attempt = j.attempts, "job leased");
        }
        Ok(jobs)
    }
}

type DownloadStream =
    Pin<Box<dyn Stream<Item = Result<pb::DownloadPluginResponse, Status>> + Send>>;

/// Records the outcome of one download exactly once (on completion, error or drop).
struct DownloadRecord {
    shared: SharedRef,
    plugin_id: String,
    version: String,
    started: Instant,
    outcome: Option<&'static str>,
}

impl Drop for DownloadRecord {
    fn drop(&mut self) {
        let status = self.outcome.unwrap_or("cancelled");
        let m = &self.shared.metrics;
        m.downloads
            .get_or_create(&DownloadLabels {
                plugin_id: self.plugin_id.clone(),
                version: self.version.clone(),
                status: status.into(),
            })
            .inc();
        if status == "success" {
            m.download_duration
                .get_or_create(&PluginIdLabel {
                    plugin_id: self.plugin_id.clone(),
                })
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

struct DownloadState {
    shared: SharedRef,
    agent_id: String,
    _stream_slot: tokio::sync::OwnedSemaphorePermit,
    reader: Box<dyn BlobReader>,
    manifest: Arc<Manifest>,
    ranges: Vec<(u32, u32)>,
    range: usize,
    next: u32,
    first: bool,
    bytes: prometheus_client::metrics::counter::Counter,
    record: DownloadRecord,
}

impl DownloadState {
    fn next_index(&mut self) -> Option<u32> {
        while let Some(&(start, end)) = self.ranges.get(self.range) {
            if self.next < start {
                self.next = start;
            }
            if self.next < end {
                let i = self.next;
                self.next += 1;
                return Some(i);
            }
            self.range += 1;
            self.next = 0;
        }
        None
    }

    async fn chunk(&mut self, index: u32) -> Result<pb::DownloadPluginResponse, Status> {
        let range = self
            .manifest
            .chunk_range(index)
            .ok_or_else(|| Status::internal("chunk index out of range"))?;
        let mut data = vec![0u8; (range.end - range.start) as usize];
        self.reader.read_exact_at(range.start, &mut data).await?;
        if let Err(e) = self.manifest.verify_chunk(index, &data) {
            tracing::error!(content = %self.manifest.content_id(), chunk = index, error = %e, "stored content is corrupt");
            return Err(Status::data_loss(format!(
                "stored content {} is corrupt at chunk {index}; re-push the plugin",
                self.manifest.content_id()
            )));
        }
        self.shared.egress.acquire(data.len() as u64).await;
        self.shared.herd.lock().expect("herd lock").served(
            self.manifest.content_id(),
            index,
            &self.agent_id,
            Instant::now(),
        );
        self.bytes.inc_by(data.len() as u64);
        let first = std::mem::replace(&mut self.first, false);
        Ok(pb::DownloadPluginResponse {
            chunk_index: index,
            offset: range.start,
            data,
            checksum: if first {
                self.manifest.content_id().to_hex()
            } else {
                String::new()
            },
            size: if first {
                self.manifest.size() as i64
            } else {
                0
            },
        })
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let s = &self.0;
        s.require_enrollment(&request)?;
        let req = request.into_inner();
        check_agent_id(&req.agent_id)?;
        let labels = labels::from_proto(&req.labels)
            .map_err(|e| Status::invalid_argument(format!("labels: {e}")))?;
        let installed = installed_from_proto(&req.installed_plugins)?;
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
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let record = AgentRecord {
            agent_id: req.agent_id.clone(),
            hostname: req.hostname,
            labels,
            peer_id: req.peer_id,
            addrs: req.addrs,
            agent_version: req.agent_version,
            installed,
            registered_at: now_ms(),
            token_hash: token_hash(&token),
        };
        let (mesh_ticket, ticket_expires_at) = s.issue_ticket(&record)?;
        let r = record.clone();
        s.store.call(move |st| st.register_agent(&r)).await?;
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
            let installed = installed_from_proto(&req.installed_plugins)?;
            let id = agent.agent_id.clone();
            let list = installed.clone();
            s.store.call(move |st| st.set_installed(&id, list)).await?;
            if let Some(live) = s
                .fleet
                .lock()
                .expect("fleet lock")
                .agents
                .get_mut(&agent.agent_id)
            {
                live.record.installed = installed;
            }
        }
        let revoked_jobs = s.extend_leases(&agent.agent_id, &req.running_jobs);
        // Renew the mesh ticket once half of its lifetime has passed.
        let half = s.config.raw.mesh.ticket_ttl.get().as_millis() as i64 / 2;
        let due = s
            .fleet
            .lock()
            .expect("fleet lock")
            .agents
            .get(&agent.agent_id)
            .is_some_and(|a| a.ticket_expires_at - now_ms() < half);
        let mut mesh_ticket = Vec::new();
        if due {
            let (ticket, expires) = s.issue_ticket(&agent)?;
            if let Some(live) = s
                .fleet
                .lock()
                .expect("fleet lock")
                .agents
                .get_mut(&agent.agent_id)
            {
                live.ticket_expires_at = expires;
            }
            mesh_ticket = ticket;
        }
        Ok(Response::new(pb::HeartbeatResponse {
            revoked_jobs,
            mesh_ticket,
        }))
    }

    async fn fetch_job(
        &self,
        request: Request<pb::FetchJobRequest>,
    ) -> Result<Response<pb::FetchJobResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        let max = req.max_jobs.clamp(1, 64) as usize;
        let wait = Duration::from_secs(u64::from(req.wait_seconds))
            .min(s.config.raw.jobs.long_poll_max.get());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = s.job_queued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let leased = s.try_lease(&agent, max).await?;
            if !leased.is_empty() {
                let mut jobs = Vec::with_capacity(leased.len());
                for detail in leased {
                    jobs.push(s.job_for_agent(&agent, detail).await?);
                }
                return Ok(Response::new(pb::FetchJobResponse { jobs }));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = s.shutdown.cancelled() => break,
            }
        }
        Ok(Response::new(pb::FetchJobResponse { jobs: Vec::new() }))
    }

    async fn report_job_result(
        &self,
        request: Request<pb::ReportJobResultRequest>,
    ) -> Result<Response<pb::ReportJobResultResponse>, Status> {
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        let status = req.status();
        if !matches!(status, pb::JobStatus::Succeeded | pb::JobStatus::Failed) {
            return Err(Status::invalid_argument(
                "status must be SUCCEEDED or FAILED",
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
        let job_id = req.job_id.clone();
        let agent_id = agent.agent_id.clone();
        let job = s
            .store
            .call(move |st| {
                st.complete_job(&agent_id, &req.job_id, |job| {
                    job.set_status(status);
                    job.exit_code = req.exit_code;
                    job.output_tail = keep_tail(&req.output_tail, tail_max);
                    job.error_message = keep_tail(&req.error_message, 4096);
                    job.plugin_results = req.plugin_results;
                    if req.started_at > 0 {
                        job.started_at = req.started_at;
                    }
                    job.finished_at = if req.finished_at > 0 {
                        req.finished_at
                    } else {
                        now_ms()
                    };
                })
            })
            .await?;
        s.leases.lock().expect("lease lock").remove(&job_id);
        let label = if status == pb::JobStatus::Succeeded {
            "succeeded"
        } else {
            "failed"
        };
        s.metrics
            .jobs_finished
            .get_or_create(&StatusLabel {
                status: label.into(),
            })
            .inc();
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
        let listed = s.store.call(move |st| st.list_plugins(&t)).await?;
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
        let s = &self.0;
        let agent = s.require_agent(&request, &request.get_ref().agent_id)?;
        let req = request.into_inner();
        let denied = |plugin_id: &str, version: &str, status: &'static str| {
            s.metrics
                .downloads
                .get_or_create(&DownloadLabels {
                    plugin_id: plugin_id.to_owned(),
                    version: version.to_owned(),
                    status: status.into(),
                })
                .inc();
        };
        let (plugin, manifest) = match s
            .resolve_for_agent(&agent, &req.plugin_id, &req.version, &req.sha256)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                let status = if e.code() == tonic::Code::PermissionDenied {
                    "denied"
                } else {
                    "error"
                };
                denied(&shown(&req.plugin_id), &shown(&req.version), status);
                return Err(e);
            }
        };
        let chunks = manifest.chunk_count();
        if req.ranges.len() > MAX_RANGES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_RANGES} chunk ranges per request"
            )));
        }
        let ranges: Vec<(u32, u32)> = if req.ranges.is_empty() {
            // The whole content (nothing to stream for empty content).
            if chunks == 0 {
                vec![]
            } else {
                vec![(0, chunks)]
            }
        } else {
            req.ranges.iter().map(|r| (r.start, r.end)).collect()
        };
        if let Some((start, end)) = ranges.iter().find(|(a, b)| a >= b || *b > chunks) {
            return Err(Status::out_of_range(format!(
                "chunk range [{start}, {end}) is invalid: ranges must be non-empty and within the {chunks} chunks of {}",
                plugin_key(&plugin.plugin_id, &plugin.version)
            )));
        }
        // Herd protection: a single chunk another mesh agent got recently comes from
        // that agent instead (bounded redirects, then served anyway).
        if let [(chunk, end)] = ranges[..] {
            if end == chunk + 1 && !agent.peer_id.is_empty() {
                let required = allowed_labels(&plugin);
                let now = now_ms();
                let fleet = s.fleet.lock().expect("fleet lock");
                let usable = |holder: &str| {
                    fleet.agents.get(holder).is_some_and(|l| {
                        !l.record.peer_id.is_empty()
                            && s.online(l, now)
                            && labels::satisfies(&l.record.labels, &required)
                    })
                };
                let decision = s.herd.lock().expect("herd lock").admit(
                    manifest.content_id(),
                    chunk,
                    &agent.agent_id,
                    Instant::now(),
                    usable,
                );
                if let Admission::Redirect {
                    holders,
                    retry_after,
                } = decision
                {
                    let hints: Vec<String> = holders
                        .iter()
                        .filter_map(|h| fleet.agents.get(h))
                        .map(|l| format!("{}={}", l.record.peer_id, l.record.addrs.join(",")))
                        .collect();
                    drop(fleet);
                    s.metrics.redirects.inc();
                    let mut status = Status::resource_exhausted(format!(
                        "chunk {chunk} of {} is already in the swarm: get it from peers ({} holder(s))",
                        plugin_key(&plugin.plugin_id, &plugin.version),
                        hints.len()
                    ));
                    let md = status.metadata_mut();
                    md.insert(
                        "arcade-retry-after-ms",
                        tonic::metadata::MetadataValue::from(
                            u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                        ),
                    );
                    if let Ok(v) = hints.join(";").parse() {
                        md.insert("arcade-holders", v);
                    }
                    return Err(status);
                }
            }
        }
        let stream_slot = s.streams.clone().try_acquire_owned().map_err(|_| {
            let mut status = Status::resource_exhausted(format!(
                "coordinator is serving its maximum of {} streams (serve.max_streams); retry shortly",
                s.config.raw.serve.max_streams
            ));
            status
                .metadata_mut()
                .insert("arcade-retry-after-ms", tonic::metadata::MetadataValue::from(200u32));
            status
        })?;
        let reader = s.blobs.open(&manifest.content_id()).await?;
        tracing::info!(agent = %agent.agent_id, plugin = %plugin_key(&plugin.plugin_id, &plugin.version), sha256 = %&plugin.sha256[..12], size = plugin.size, "download started");
        let state = DownloadState {
            shared: s.clone(),
            agent_id: agent.agent_id.clone(),
            _stream_slot: stream_slot,
            reader,
            manifest,
            ranges,
            range: 0,
            next: 0,
            first: true,
            bytes: s
                .metrics
                .served_bytes
                .get_or_create(&PluginVersionLabels {
                    plugin_id: plugin.plugin_id.clone(),
                    version: plugin.version.clone(),
                })
                .clone(),
            record: DownloadRecord {
                shared: s.clone(),
                plugin_id: plugin.plugin_id.clone(),
                version: plugin.version.clone(),
                started: Instant::now(),
                outcome: None,
            },
        };
        let stream = futures::stream::unfold(Some(state), |state| async move {
            let mut st = state?;
            match st.next_index() {
                Some(i) => match st.chunk(i).await {
                    Ok(msg) => Some((Ok(msg), Some(st))),
                    Err(e) => {
                        st.record.outcome = Some("error");
                        Some((Err(e), None))
                    }
                },
                None => {
                    st.record.outcome = Some("success");
                    None
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let leases: Vec<(String, String)> = s
            .leases
            .lock()
            .expect("lease lock")
            .iter()
            .map(|(j, (a, _))| (j.clone(), a.clone()))
            .collect();
        let now = now_ms();
        let fleet = s.fleet.lock().expect("fleet lock");
        let mut agents: Vec<pb::AgentSummary> = fleet
            .agents
            .values()
            .map(|a| {
                let r = &a.record;
                let mut running: Vec<String> = leases
                    .iter()
                    .filter(|(_, agent)| *agent == r.agent_id)
                    .map(|(j, _)| j.clone())
                    .collect();
                running.sort();
                pb::AgentSummary {
                    agent_id: r.agent_id.clone(),
                    hostname: r.hostname.clone(),
                    labels: labels::to_proto(&r.labels),
                    peer_id: r.peer_id.clone(),
                    addrs: r.addrs.clone(),
                    agent_version: r.agent_version.clone(),
                    installed_plugins: installed_to_proto(&r.installed),
                    registered_at: r.registered_at,
                    last_seen: a.last_seen,
                    online: s.online(a, now),
                    running_jobs: running,
                }
            })
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok(Response::new(pb::ListAgentsResponse { agents }))
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
