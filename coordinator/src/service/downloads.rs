//! `Agent.DownloadPlugin`: a plugin's content streamed one verified chunk per message
//! over the requested chunk ranges, behind the herd check (a single chunk another mesh
//! agent got recently is pointed at that agent instead), the stream limit and the
//! egress limiter. Memory per stream is two chunks (one read ahead); a stream the client
//! stops reading ends after `serve.stall_timeout`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arcade_p2p::Manifest;
use arcade_p2p::labels;
use arcade_proto::v1 as pb;
use futures::Stream;
use tonic::{Request, Response, Status};

use super::herd::Admission;
use super::{SharedRef, allowed_labels, now_ms};
use crate::blob::BlobReader;
use crate::metrics::{DownloadLabels, PluginVersionLabels};
use crate::store::plugin_key;

/// The `plugin_id` and `version` label of downloads refused before a plugin was found.
pub(crate) const UNKNOWN_LABEL: &str = "unknown";

/// Most chunk ranges in one download request.
const MAX_RANGES: usize = 1024;

pub(crate) type DownloadStream =
    Pin<Box<dyn Stream<Item = Result<pb::DownloadPluginResponse, Status>> + Send>>;

/// One of an agent's `serve.max_streams_per_agent` download streams; released on drop.
struct AgentStreamSlot {
    shared: SharedRef,
    agent_id: String,
}

impl AgentStreamSlot {
    fn take(shared: &SharedRef, agent_id: &str) -> Result<Self, Status> {
        let max = shared.config.raw.serve.max_streams_per_agent as usize;
        let mut open = shared.agent_streams.lock().expect("agent streams lock");
        let n = open.entry(agent_id.to_owned()).or_default();
        if *n >= max {
            let mut status = Status::resource_exhausted(format!(
                "agent {agent_id} already has {max} DownloadPlugin streams open (serve.max_streams_per_agent); finish or cancel one and retry"
            ));
            status.metadata_mut().insert(
                "arcade-retry-after-ms",
                tonic::metadata::MetadataValue::from(200u32),
            );
            return Err(status);
        }
        *n += 1;
        Ok(Self {
            shared: shared.clone(),
            agent_id: agent_id.to_owned(),
        })
    }
}

impl Drop for AgentStreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .agent_streams
            .lock()
            .expect("agent streams lock");
        if let Some(n) = open.get_mut(&self.agent_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.agent_id);
            }
        }
    }
}

struct DownloadState {
    _agent_slot: AgentStreamSlot,
    shared: SharedRef,
    agent_id: String,
    _stream_slot: tokio::sync::OwnedSemaphorePermit,
    reader: Box<dyn BlobReader>,
    manifest: Arc<Manifest>,
    ranges: Vec<(u32, u32)>,
    range: usize,
    next: u32,
    first: bool,
    /// The agent decodes zstd chunks.
    accept_zstd: bool,
    bytes: prometheus_client::metrics::counter::Counter,
    plugin_id: String,
    version: String,
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
        // Compressed (when asked and it pays) off the async workers; the egress limit and
        // the served bytes count what goes on the wire.
        let raw_len = data.len() as u64;
        let (data, encoding) = match self.shared.compressor.clone().filter(|_| self.accept_zstd) {
            Some(compressor) => {
                let content = self.manifest.content_id();
                tokio::task::spawn_blocking(move || match compressor.compress(&content, &data) {
                    Some(packed) => (packed, pb::ChunkEncoding::Zstd),
                    None => (data, pb::ChunkEncoding::Raw),
                })
                .await
                .map_err(|e| Status::internal(format!("compression task failed: {e}")))?
            }
            None => (data, pb::ChunkEncoding::Raw),
        };
        if encoding == pb::ChunkEncoding::Zstd {
            self.shared
                .metrics
                .compression_saved_bytes
                .inc_by(raw_len.saturating_sub(data.len() as u64));
        }
        self.shared.egress.acquire(data.len() as u64).await;
        self.shared.herd.lock().expect("herd lock").served(
            self.manifest.content_id(),
            index,
            &self.agent_id,
            Instant::now(),
        );
        self.bytes.inc_by(data.len() as u64);
        let ended = self.shared.fetches.lock().expect("fetches lock").served(
            &self.agent_id,
            self.manifest.content_id(),
            &self.plugin_id,
            &self.version,
            self.manifest.chunk_count(),
            index,
            data.len() as u64,
            Instant::now(),
        );
        if let Some(ended) = ended {
            super::fetches::record(&self.shared.metrics, &ended);
        }
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
            encoding: encoding as i32,
        })
    }
}

pub(crate) async fn download_plugin(
    s: &SharedRef,
    request: Request<pb::DownloadPluginRequest>,
) -> Result<Response<DownloadStream>, Status> {
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
            // Label values are bounded to plugins that exist: a refusal names the
            // plugin (it was found), anything else — unknown ids, bad input — counts
            // under `unknown`, so requests cannot mint new metric series.
            if e.code() == tonic::Code::PermissionDenied {
                denied(&req.plugin_id, &req.version, "denied");
            } else {
                denied(UNKNOWN_LABEL, UNKNOWN_LABEL, "error");
            }
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
    let agent_slot = AgentStreamSlot::take(s, &agent.agent_id)?;
    let stream_slot = s.streams.clone().try_acquire_owned().map_err(|_| {
        let mut status = Status::resource_exhausted(format!(
            "coordinator is serving its maximum of {} streams (serve.max_streams); retry shortly",
            s.config.raw.serve.max_streams
        ));
        status.metadata_mut().insert(
            "arcade-retry-after-ms",
            tonic::metadata::MetadataValue::from(200u32),
        );
        status
    })?;
    let reader = s.blobs.open(&manifest.content_id()).await?;
    tracing::info!(agent = %agent.agent_id, plugin = %plugin_key(&plugin.plugin_id, &plugin.version), sha256 = %&plugin.sha256[..12], size = plugin.size, "download started");
    let state = DownloadState {
        _agent_slot: agent_slot,
        shared: s.clone(),
        agent_id: agent.agent_id.clone(),
        _stream_slot: stream_slot,
        reader,
        manifest,
        ranges,
        range: 0,
        next: 0,
        first: true,
        accept_zstd: req.accept_zstd,
        bytes: s
            .metrics
            .served_bytes
            .get_or_create(&PluginVersionLabels {
                plugin_id: plugin.plugin_id.clone(),
                version: plugin.version.clone(),
            })
            .clone(),
        plugin_id: plugin.plugin_id.clone(),
        version: plugin.version.clone(),
    };
    let stall = s.config.raw.serve.stall_timeout.get();
    Ok(Response::new(serve(state, stall)))
}

/// Streams `state`'s chunks from a task of its own, one chunk ahead of the client. A
/// chunk the client has not taken within `stall` (it stopped reading, so HTTP/2 flow
/// control stopped polling the response) ends the task — its stream slots, reader and
/// chunk are released at once — and the client, if it ever reads on, gets
/// `DEADLINE_EXCEEDED` after what was already sent.
fn serve(state: DownloadState, stall: std::time::Duration) -> DownloadStream {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        let mut st = state;
        loop {
            let item = match st.next_index() {
                Some(i) => st.chunk(i).await,
                None => return,
            };
            let failed = item.is_err();
            if failed {
                let ended = st
                    .shared
                    .fetches
                    .lock()
                    .expect("fetches lock")
                    .failed(&st.agent_id, st.manifest.content_id());
                if let Some(ended) = ended {
                    super::fetches::record(&st.shared.metrics, &ended);
                }
            }
            match tokio::time::timeout(stall, tx.send(item)).await {
                Ok(Ok(())) if !failed => {}
                // Failed (sent), or the client went away (recorded as cancelled).
                Ok(_) => return,
                Err(_) => {
                    tracing::warn!(agent = %st.agent_id, content = %st.manifest.content_id(), "download stream not read for {stall:?} (serve.stall_timeout): ended");
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
        }
    });
    Box::pin(futures::stream::unfold(
        (rx, stalled, false),
        move |(mut rx, stalled, ended)| async move {
            if ended {
                return None;
            }
            match rx.recv().await {
                Some(item) => Some((item, (rx, stalled, false))),
                None if stalled.load(std::sync::atomic::Ordering::SeqCst) => Some((
                    Err(Status::deadline_exceeded(format!(
                        "this download was not read for {stall:?} (serve.stall_timeout): request the missing chunks again"
                    ))),
                    (rx, stalled, true),
                )),
                None => None,
            }
        },
    ))
}
