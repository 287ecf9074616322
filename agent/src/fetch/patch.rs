//! A version built from a patch (`arcade_p2p::delta`) instead of fetched whole.
//!
//! When the coordinator offers patches to the wanted content (`PluginInfo.patches`) and
//! this agent holds one of their bases, it fetches the patch — a content of its own, by
//! its SHA-256, from the coordinator and peers, chunk-verified like any other — applies
//! it to the base (the base and the decoder's window in memory, both bounded by
//! `download.patch_max_memory`), writes the result as the wanted content's partial file
//! and publishes it, which checks its SHA-256. Anything that fails (no usable offer, a
//! fetch error, a patch that does not apply, a result whose SHA-256 differs) leaves no
//! partial behind, and the caller fetches the whole version instead.

use arcade_p2p::{Manifest, PluginRef};
use arcade_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::{Fetched, Fetcher};

/// The patch chosen for a fetch.
struct Chosen {
    patch: pb::PatchInfo,
    manifest: Manifest,
    base_path: std::path::PathBuf,
}

impl Fetcher {
    /// Picks an offered patch whose base this agent holds and that fits the memory
    /// limit.
    async fn choose_patch(
        &self,
        target: &Manifest,
        info: &pb::PluginInfo,
    ) -> Result<Option<Chosen>, String> {
        let cache = self.cache.clone();
        let held = tokio::task::spawn_blocking(move || cache.installed())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let limit = self.config.patch_max_memory.bytes();
        for offer in &info.patches {
            let (Some(patch), Some(m)) = (&offer.patch, &offer.manifest) else {
                continue;
            };
            if patch.target_sha256 != info.checksum {
                continue;
            }
            let Some(base) = held.iter().find(|c| c.sha256.to_hex() == patch.base_sha256) else {
                continue;
            };
            let window = 1u64.checked_shl(patch.window_log).unwrap_or(u64::MAX);
            if base
                .size
                .saturating_add(window)
                .saturating_add(target.size())
                > limit
            {
                tracing::info!(base = %base.plugin, window_log = patch.window_log, "patch not used: it needs more than download.patch_max_memory");
                continue;
            }
            let manifest =
                Manifest::from_proto(m).map_err(|e| format!("the patch's manifest: {e}"))?;
            if manifest.content_id().to_hex() != patch.patch_sha256
                || manifest.size() != patch.patch_size
            {
                return Err("the patch's manifest does not match the patch".into());
            }
            return Ok(Some(Chosen {
                patch: patch.clone(),
                manifest,
                base_path: base.path.clone(),
            }));
        }
        Ok(None)
    }

    /// Builds `plugin` (of `target`'s content) from a patch; `Ok(None)` when no offered
    /// patch is usable here. See the module doc.
    pub(super) async fn via_patch(
        &self,
        plugin: &PluginRef,
        target: &Manifest,
        info: &pb::PluginInfo,
        cancel: &CancellationToken,
    ) -> Result<Option<Fetched>, String> {
        let Some(chosen) = self.choose_patch(target, info).await? else {
            return Ok(None);
        };
        let patch_id = chosen.manifest.content_id();
        if let Some(mesh) = &self.mesh {
            // Peers may ask us for the patch's chunks while we fetch it.
            let described = pb::PluginInfo {
                checksum: chosen.patch.patch_sha256.clone(),
                size: chosen.patch.patch_size as i64,
                manifest: Some(chosen.manifest.to_proto()),
                patches: Vec::new(),
                peer_hints: Vec::new(),
                ..info.clone()
            };
            mesh.learn(&described, &chosen.manifest).await;
        }
        let (bytes_by_source, swarm) = self
            .fetch_content(plugin, true, &chosen.manifest, Vec::new(), cancel)
            .await
            .map_err(|e| format!("fetching the patch: {e}"))?;
        let cache = self.cache.clone();
        let (window, len, target_id) =
            (chosen.patch.window_log, target.size(), target.content_id());
        let base_path = chosen.base_path.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let patch_path = cache.partial_path(&patch_id);
            let out_path = cache.partial_path(&target_id);
            let result = (|| {
                let base = std::fs::read(&base_path).map_err(|e| e.to_string())?;
                let patch = std::fs::read(&patch_path).map_err(|e| e.to_string())?;
                let file = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
                let mut out = std::io::BufWriter::new(file);
                arcade_p2p::delta::apply_patch(&base, &patch, &mut out, len, window)
                    .map_err(|e| e.to_string())?;
                let file = out.into_inner().map_err(|e| e.to_string())?;
                file.sync_all().map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            })();
            // The patch's partial file and progress go either way; the target's partial
            // stays only when the patch applied (publish checks its SHA-256), and its
            // old progress records (of an earlier whole fetch) no longer describe it.
            let _ = cache.clear_progress(&patch_id);
            if result.is_err() {
                let _ = cache.clear_progress(&target_id);
            } else {
                let _ = cache.save_progress(&target_id, &[]);
            }
            result
        })
        .await
        .map_err(|e| e.to_string())?;
        applied.map_err(|e| format!("applying the patch: {e}"))?;
        let cache = self.cache.clone();
        let (p, m) = (plugin.clone(), target.clone());
        let published = tokio::task::spawn_blocking(move || {
            let r = cache.publish(&p, &m);
            if r.is_err() {
                let _ = cache.clear_progress(&m.content_id());
            }
            r
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the patched version: {e}"))?;
        self.refresh_cache_metrics().await;
        self.metrics.patch_bytes.inc_by(chosen.patch.patch_size);
        self.metrics.patched_bytes.inc_by(len);
        tracing::info!(
            plugin = %plugin,
            base = %chosen.patch.base_version,
            patch_bytes = chosen.patch.patch_size,
            bytes = len,
            "plugin built from a patch and verified"
        );
        Ok(Some(Fetched {
            plugin: published,
            cache_hit: false,
            bytes_by_source,
            swarm,
        }))
    }
}
