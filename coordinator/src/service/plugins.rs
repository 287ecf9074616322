//! `PluginAdmin`: push (client-streaming, verified, content-addressed), list, get,
//! enable/disable and delete; preheat (in `preheat.rs`); patches to a pushed version
//! (in `patches.rs`).

use std::sync::Arc;

use arcade_p2p::labels;
use arcade_p2p::publisher::{self, PublisherId};
use arcade_p2p::{ContentId, ManifestBuilder, PluginRef, manifest};
use arcade_proto::v1 as pb;
use arcade_proto::v1::plugin_admin_server::PluginAdmin;
use tonic::{Request, Response, Status, Streaming};

use super::{SharedRef, now_ms, shown};
use crate::blob::BlobError;
use crate::metrics::StatusLabel;
use crate::store::{PutOutcome, StoreError};

/// The `PluginAdmin` service.
pub(crate) struct PluginAdminService(pub(crate) SharedRef);

/// True for content an agent can run: an ELF binary or a `#!` script.
fn looks_executable(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.starts_with(b"#!")
}

/// A blob-store failure while storing the push of `key`, as a status that names the
/// plugin (e.g. "plugin a/b@1.0.0 not stored: coordinator storage is full: ...").
fn not_stored(key: &str, e: BlobError) -> Status {
    let status = Status::from(e);
    Status::new(
        status.code(),
        format!("plugin {key} not stored: {}", status.message()),
    )
}

impl PluginAdminService {
    fn count_push(&self, status: &str) {
        self.0
            .metrics
            .pushes
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    async fn push(
        &self,
        mut stream: Streaming<pb::PushPluginRequest>,
    ) -> Result<pb::PushPluginResponse, Status> {
        let s = &self.0;
        let header = match stream.message().await? {
            Some(pb::PushPluginRequest {
                msg: Some(pb::push_plugin_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of PushPlugin must be the header (plugin_id, version, ...)",
                ));
            }
        };
        let r = PluginRef::new(&header.plugin_id, &header.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = r.key();
        let allowed = labels::from_proto(&header.allowed_labels)
            .map_err(|e| Status::invalid_argument(format!("allowed_labels: {e}")))?;
        // Keys that guard content are restricted from now on (before the plugin exists,
        // so no agent can self-declare its way in meanwhile).
        s.identity.note_acl(&allowed);
        let plugin_type = if header.plugin_type.is_empty() {
            r.id.first_segment().to_owned()
        } else {
            header.plugin_type.clone()
        };
        if plugin_type.len() > 64
            || !plugin_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(Status::invalid_argument(format!(
                "plugin_type {:?} is invalid: at most 64 characters of [a-z0-9._-]",
                shown(&plugin_type)
            )));
        }
        if header.name.len() > 256 || header.description.len() > 4096 {
            return Err(Status::invalid_argument(
                "name must be at most 256 bytes and description at most 4096 bytes",
            ));
        }
        let expected: Option<ContentId> = if header.expected_sha256.is_empty() {
            None
        } else {
            Some(
                header
                    .expected_sha256
                    .parse()
                    .map_err(|e| Status::invalid_argument(format!("expected_sha256: {e}")))?,
            )
        };
        if expected.is_none() && s.config.raw.plugin.security.require_checksum {
            return Err(Status::invalid_argument(
                "expected_sha256 is required ([plugin.security] require_checksum = true): send the SHA-256 of the content",
            ));
        }
        let k = key.clone();
        let existing = s.store.get_plugin(&k).await?;
        if let (Some(old), Some(exp)) = (&existing, &expected) {
            if old.sha256 != exp.to_hex() {
                return Err(Status::already_exists(format!(
                    "plugin {key} already exists with other content (sha256 {}); push a new version",
                    old.sha256
                )));
            }
        }

        let max = s.config.raw.plugin.max_plugin_size.bytes();
        let mut builder = match &header.cdc {
            None => ManifestBuilder::new(s.config.chunk_size)
                .map_err(|e| Status::internal(e.to_string()))?,
            Some(p) => manifest::cdc_from_proto(p)
                .and_then(ManifestBuilder::content_defined)
                .map_err(|e| Status::invalid_argument(format!("cdc: {e}")))?,
        };
        let mut staged = s.blobs.stage().await.map_err(|e| not_stored(&key, e))?;
        let mut head = Vec::with_capacity(4);
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(pb::push_plugin_request::Msg::Data(data)) => {
                    let total = builder.size() + data.len() as u64;
                    if total > max {
                        return Err(Status::resource_exhausted(format!(
                            "plugin {key} exceeds max_plugin_size ({} bytes): raise [plugin] max_plugin_size to accept it",
                            max
                        )));
                    }
                    if head.len() < 4 {
                        let take = (4 - head.len()).min(data.len());
                        head.extend_from_slice(&data[..take]);
                    }
                    builder
                        .update(&data)
                        .map_err(|e| Status::resource_exhausted(e.to_string()))?;
                    s.metrics.pushed_bytes.inc_by(data.len() as u64);
                    staged.write(&data).await.map_err(|e| not_stored(&key, e))?;
                }
                Some(pb::push_plugin_request::Msg::Header(_)) => {
                    return Err(Status::invalid_argument("PushPlugin header sent twice"));
                }
                None => {}
            }
        }
        let mut manifest = builder.finish();
        let id = manifest.content_id();
        if let Some(exp) = expected {
            if exp != id {
                return Err(Status::invalid_argument(format!(
                    "checksum mismatch for {key}: expected sha256 {exp} but the content hashes to {id}; nothing stored"
                )));
            }
        }
        if !header.signer.is_empty() || !header.signature.is_empty() {
            // Agents check signatures against their own keys; the coordinator refuses a
            // signature that cannot be the publisher's for these bytes, so a mistake shows
            // at push time, not as jobs refused across the fleet.
            let signer = PublisherId::from_bytes(&header.signer)
                .map_err(|e| Status::invalid_argument(format!("signer: {e}")))?;
            let statement =
                publisher::statement(r.id.as_str(), &r.version.to_string(), &id, manifest.size());
            if !signer.verifies(&statement, &header.signature) {
                return Err(Status::invalid_argument(format!(
                    "the signature by {signer} does not match {key} with sha256 {id}; nothing stored"
                )));
            }
        }
        if !s.config.raw.plugin.security.allow_unsafe && !looks_executable(&head) {
            return Err(Status::invalid_argument(format!(
                "plugin {key} is neither an ELF executable nor a script starting with `#!`; set [plugin.security] allow_unsafe = true to accept other content"
            )));
        }
        if let Some(old) = existing {
            let signed = !header.signer.is_empty();
            if old.sha256 == id.to_hex()
                && signed
                && (old.signer != header.signer || old.signature != header.signature)
            {
                // Answering "unchanged" would drop the signature the publisher sent.
                let was = PublisherId::from_bytes(&old.signer)
                    .map(|k| format!("signed by {k}"))
                    .unwrap_or_else(|_| "unsigned".into());
                return Err(Status::already_exists(format!(
                    "plugin {key} already exists, {was}; a pushed version's signature cannot change: push a new version"
                )));
            }
            return if old.sha256 == id.to_hex() {
                // The same version again: its stored content is checked and, if it was
                // damaged or lost on disk, replaced by these verified bytes.
                let _guard = s.content_lock.lock().await;
                staged.commit(&id).await.map_err(|e| not_stored(&key, e))?;
                Ok(pb::PushPluginResponse {
                    plugin: Some(old),
                    created: false,
                })
            } else {
                Err(Status::already_exists(format!(
                    "plugin {key} already exists with other content (sha256 {}); push a new version",
                    old.sha256
                )))
            };
        }
        // The same bytes stored for another version keep the chunks they were stored
        // with (one manifest per content): the record describes those.
        if let Some(stored) = s.store.get_manifest(id).await? {
            if stored != manifest {
                tracing::info!(plugin = %key, sha256 = %id, "content already stored with other chunks: keeping its manifest");
            }
            manifest = stored;
        }
        let record = pb::PluginVersion {
            plugin_id: r.id.to_string(),
            version: r.version.to_string(),
            plugin_type,
            name: if header.name.is_empty() {
                r.id.to_string()
            } else {
                header.name.clone()
            },
            description: header.description.clone(),
            sha256: id.to_hex(),
            size: manifest.size(),
            chunk_size: manifest.chunk_size(),
            chunks: manifest.chunk_count(),
            cdc: manifest.cdc().map(manifest::cdc_to_proto),
            allowed_labels: labels::to_proto(&allowed),
            enabled: true,
            created_at: now_ms(),
            signer: header.signer.clone(),
            signature: header.signature.clone(),
        };
        let _guard = s.content_lock.lock().await;
        staged.commit(&id).await.map_err(|e| not_stored(&key, e))?;
        let rec = record.clone();
        let m = Arc::new(manifest.clone());
        match s.store.put_plugin(rec, m).await {
            Ok(PutOutcome::Created) => {
                tracing::info!(plugin = %key, sha256 = %id, size = manifest.size(), chunks = manifest.chunk_count(), "plugin pushed");
                s.schedule_patches(record.clone());
                Ok(pb::PushPluginResponse {
                    plugin: Some(record),
                    created: true,
                })
            }
            Ok(PutOutcome::Existing) => {
                let k = key.clone();
                let stored = s.store.get_plugin(&k).await?;
                Ok(pb::PushPluginResponse {
                    plugin: stored,
                    created: false,
                })
            }
            Err(e @ StoreError::Conflict { .. }) => {
                // A concurrent push of other content won; drop our blob unless used.
                let refs = s.store.referenced_contents().await?;
                if !refs.contains(&id) {
                    s.blobs.remove(&id).await?;
                }
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[tonic::async_trait]
impl PluginAdmin for PluginAdminService {
    async fn preheat_plugin(
        &self,
        request: Request<pb::PreheatPluginRequest>,
    ) -> Result<Response<pb::PreheatPluginResponse>, Status> {
        self.0.require_admin(&request)?;
        let preheat = self.0.preheat_plugin(request.into_inner()).await?;
        Ok(Response::new(pb::PreheatPluginResponse {
            preheat: Some(preheat),
        }))
    }

    async fn get_preheat(
        &self,
        request: Request<pb::GetPreheatRequest>,
    ) -> Result<Response<pb::GetPreheatResponse>, Status> {
        self.0.require_admin(&request)?;
        let preheat = self.0.get_preheat(&request.into_inner().preheat_id)?;
        Ok(Response::new(pb::GetPreheatResponse {
            preheat: Some(preheat),
        }))
    }

    async fn push_plugin(
        &self,
        request: Request<Streaming<pb::PushPluginRequest>>,
    ) -> Result<Response<pb::PushPluginResponse>, Status> {
        self.0.require_admin(&request)?;
        match self.push(request.into_inner()).await {
            Ok(resp) => {
                self.count_push(if resp.created { "created" } else { "existing" });
                Ok(Response::new(resp))
            }
            Err(status) => {
                self.count_push("rejected");
                tracing::warn!(code = ?status.code(), message = status.message(), "plugin push rejected");
                Err(status)
            }
        }
    }

    async fn list_plugins(
        &self,
        request: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        self.0.require_admin(&request)?;
        let t = request.into_inner().plugin_type;
        let plugins = self.0.store.list_plugins(&t).await?;
        Ok(Response::new(pb::ListPluginsResponse { plugins }))
    }

    async fn get_plugin(
        &self,
        request: Request<pb::GetPluginRequest>,
    ) -> Result<Response<pb::GetPluginResponse>, Status> {
        self.0.require_admin(&request)?;
        let req = request.into_inner();
        let r = PluginRef::new(&req.plugin_id, &req.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plugin = self.0.plugin(&r.key()).await?;
        let id: ContentId = plugin
            .sha256
            .parse()
            .map_err(|_| Status::internal("stored plugin has a bad sha256"))?;
        let manifest = self.0.manifest(id).await?;
        let patches = self.0.store.patches_to(id).await?;
        Ok(Response::new(pb::GetPluginResponse {
            plugin: Some(plugin),
            manifest: Some(manifest.to_proto()),
            patches,
        }))
    }

    async fn set_plugin_enabled(
        &self,
        request: Request<pb::SetPluginEnabledRequest>,
    ) -> Result<Response<pb::SetPluginEnabledResponse>, Status> {
        self.0.require_admin(&request)?;
        let req = request.into_inner();
        let key = PluginRef::new(&req.plugin_id, &req.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .key();
        let k = key.clone();
        let s = &self.0;
        let plugin = s.store.set_enabled(&k, req.enabled).await?;
        s.invalidate_plugin(&key);
        tracing::info!(plugin = %key, enabled = plugin.enabled, "plugin enabled state changed");
        if !req.enabled {
            // Queued jobs that need it can never run now: they fail, saying why.
            let reason = format!(
                "plugin {key} was disabled while the job was queued; enable it or create the job with another version"
            );
            let failed = s.store.fail_queued_needing(&key, &reason, now_ms()).await?;
            let mut d = s.dispatch.lock().expect("dispatch lock");
            for id in &failed {
                d.remove(id);
            }
            s.sync_dispatch_gauges(&d);
            drop(d);
            for id in &failed {
                s.count_finished("failed");
                tracing::warn!(job = %id, plugin = %key, "queued job failed: plugin disabled");
            }
        }
        Ok(Response::new(pb::SetPluginEnabledResponse {
            plugin: Some(plugin),
        }))
    }

    async fn delete_plugin(
        &self,
        request: Request<pb::DeletePluginRequest>,
    ) -> Result<Response<pb::DeletePluginResponse>, Status> {
        self.0.require_admin(&request)?;
        let req = request.into_inner();
        let key = PluginRef::new(&req.plugin_id, &req.version)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .key();
        let _guard = self.0.content_lock.lock().await;
        let k = key.clone();
        let orphans = self.0.store.delete_plugin(&k).await?;
        self.0.invalidate_plugin(&key);
        // The version's own content first (the answer says whether it went), then the
        // patches from or to it.
        let mut content_removed = false;
        for (i, id) in orphans.iter().enumerate() {
            self.0.manifests.remove(id);
            self.0.patch_of.remove(id);
            let removed = self.0.blobs.remove(id).await?;
            if i == 0 {
                content_removed = removed;
            }
        }
        tracing::info!(plugin = %key, content_removed, "plugin deleted");
        Ok(Response::new(pb::DeletePluginResponse { content_removed }))
    }
}

/// Removes blobs no plugin references (left by a crash between the blob rename and the
/// metadata commit). Called once at start, before serving.
pub(crate) async fn collect_orphans(shared: &Arc<super::Shared>) -> Result<usize, Status> {
    let refs = shared.store.referenced_contents().await?;
    let mut removed = 0;
    for id in shared.blobs.list().await? {
        if !refs.contains(&id) && shared.blobs.remove(&id).await? {
            tracing::info!(content = %id, "removed unreferenced blob");
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::{BlobError, looks_executable, not_stored};

    #[test]
    fn storage_full_names_the_plugin_and_the_space() {
        let full = BlobError::from_io(std::io::Error::from_raw_os_error(28));
        let status = not_stored("big/one@1.0.0", full);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let msg = status.message();
        assert!(
            msg.starts_with("plugin big/one@1.0.0 not stored: "),
            "{msg}"
        );
        assert!(msg.contains("storage is full"), "{msg}");
        assert!(msg.contains("plugin.storage_path"), "{msg}");
    }

    #[test]
    fn executable_detection() {
        assert!(looks_executable(b"#!/bin/sh\n"));
        assert!(looks_executable(b"\x7fELF\x02"));
        assert!(!looks_executable(b""));
        assert!(!looks_executable(b"MZ\x90\x00"));
    }
}
