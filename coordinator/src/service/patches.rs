//! Patches to a newly pushed version from older ones (`arcade_p2p::delta`), built in
//! the background after the push is answered.
//!
//! For a new version, the newest `plugin.patch_bases` older enabled versions of the same
//! plugin (by semver, other content) each get a patch at `plugin.patch_level`, one build
//! at a time on the blocking pool, when base and target together fit in
//! `plugin.patch_max_size`. A patch is kept only when it is at most 3/4 of the whole
//! version compressed at level 3 — otherwise an agent gains little over compressed
//! chunks. A kept patch is content like any plugin's: a blob under its SHA-256 and a
//! manifest, recorded with its base and target (`MetaStore::put_patch`), listed by
//! `GetPlugin`, and removed when its base or target content is deleted. A delete that
//! wins the race against a build leaves no patch behind (`PatchOrphaned`).

use std::sync::Arc;

use arcade_p2p::{ContentId, ManifestBuilder};
use arcade_proto::v1 as pb;
use tonic::Status;

use super::{Shared, SharedRef, now_ms};
use crate::store::StoreError;

/// A patch is kept when it is at most this fraction (numerator / 4) of the whole target
/// compressed.
const KEEP_QUARTERS: u64 = 3;

impl Shared {
    /// Builds patches to `target` in the background (see the module doc).
    pub(crate) fn schedule_patches(self: &SharedRef, target: pb::PluginVersion) {
        if self.config.raw.plugin.patch_bases == 0 {
            return;
        }
        let s = Arc::clone(self);
        tokio::spawn(async move {
            let shutdown = s.shutdown.clone();
            tokio::select! {
                r = s.build_patches(&target) => {
                    if let Err(e) = r {
                        tracing::warn!(plugin = %format!("{}@{}", target.plugin_id, target.version), error = %e.message(), "patches not built");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }

    async fn read_content(&self, id: &ContentId, size: u64) -> Result<Vec<u8>, Status> {
        let mut reader = self.blobs.open(id).await?;
        let mut out = vec![0u8; size as usize];
        reader.read_exact_at(0, &mut out).await?;
        Ok(out)
    }

    async fn build_patches(&self, target: &pb::PluginVersion) -> Result<(), Status> {
        let _one = self
            .patch_builds
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let cfg = &self.config.raw.plugin;
        let shown = format!("{}@{}", target.plugin_id, target.version);
        let bad = |what: &str| Status::internal(format!("stored plugin {shown} has a bad {what}"));
        let version: semver::Version = target.version.parse().map_err(|_| bad("version"))?;
        let target_id: ContentId = target.sha256.parse().map_err(|_| bad("sha256"))?;
        let mut bases: Vec<(semver::Version, pb::PluginVersion)> = self
            .store
            .versions_of(&target.plugin_id)
            .await?
            .into_iter()
            .filter(|p| p.enabled && p.sha256 != target.sha256)
            .filter_map(|p| Some((p.version.parse::<semver::Version>().ok()?, p)))
            .filter(|(v, _)| *v < version)
            .collect();
        bases.sort_by(|a, b| b.0.cmp(&a.0));
        bases.truncate(cfg.patch_bases as usize);
        let existing = self.store.patches_to(target_id).await?;
        // The target's bytes and its whole compressed size: read and measured once, for
        // the first base that needs them.
        let mut target_bytes: Option<(Arc<Vec<u8>>, u64)> = None;
        for (_, base) in bases {
            if existing.iter().any(|p| p.base_sha256 == base.sha256) {
                continue;
            }
            if base.size.saturating_add(target.size) > cfg.patch_max_size.bytes() {
                tracing::info!(plugin = %shown, base = %base.version, "no patch: base and target exceed plugin.patch_max_size");
                continue;
            }
            let Ok(base_id) = base.sha256.parse::<ContentId>() else {
                continue;
            };
            let (t, whole) = match &target_bytes {
                Some((t, whole)) => (Arc::clone(t), *whole),
                None => {
                    let t = Arc::new(self.read_content(&target_id, target.size).await?);
                    let measured = Arc::clone(&t);
                    let whole = tokio::task::spawn_blocking(move || {
                        arcade_p2p::delta::compressed_size(&measured, 3)
                    })
                    .await
                    .map_err(|e| Status::internal(format!("compression task failed: {e}")))?
                    .map_err(|e| Status::internal(e.to_string()))?;
                    target_bytes = Some((Arc::clone(&t), whole));
                    (t, whole)
                }
            };
            let b = self.read_content(&base_id, base.size).await?;
            let level = cfg.patch_level as i32;
            let started = std::time::Instant::now();
            let patch =
                tokio::task::spawn_blocking(move || arcade_p2p::delta::make_patch(&b, &t, level))
                    .await
                    .map_err(|e| Status::internal(format!("patch task failed: {e}")))?
                    .map_err(|e| Status::internal(e.to_string()))?;
            let build_s = started.elapsed().as_secs_f64();
            if patch.len() as u64 * 4 > whole * KEEP_QUARTERS {
                tracing::info!(plugin = %shown, base = %base.version, patch = patch.len(), compressed = whole, "patch not kept: not clearly smaller than the compressed version");
                continue;
            }
            let mut builder = ManifestBuilder::new(self.config.chunk_size)
                .map_err(|e| Status::internal(e.to_string()))?;
            builder
                .update(&patch)
                .map_err(|e| Status::internal(e.to_string()))?;
            let manifest = builder.finish();
            let patch_id = manifest.content_id();
            let info = pb::PatchInfo {
                base_sha256: base.sha256.clone(),
                target_sha256: target.sha256.clone(),
                patch_sha256: patch_id.to_hex(),
                patch_size: patch.len() as u64,
                level,
                window_log: arcade_p2p::delta::window_log_for(base.size, target.size),
                base_version: base.version.clone(),
                created_at: now_ms(),
            };
            let _guard = self.content_lock.lock().await;
            let mut staged = self.blobs.stage().await?;
            staged.write(&patch).await?;
            staged.commit(&patch_id).await?;
            match self.store.put_patch(info, Arc::new(manifest)).await {
                Ok(()) => {
                    tracing::info!(plugin = %shown, base = %base.version, patch = patch.len(), compressed = whole, build_s, "patch built");
                }
                Err(StoreError::PatchOrphaned(_)) => {
                    // The base or the target was deleted meanwhile.
                    if !self.store.referenced_contents().await?.contains(&patch_id) {
                        self.blobs.remove(&patch_id).await?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
