//! What agents are told about plugins: access checks (labels, enabled versions),
//! plugin infos with their manifest, peer hints and publisher signature, and the
//! agent-facing form of a leased job.

use std::sync::Arc;

use arcade_p2p::{ContentId, Manifest, PluginRef};
use arcade_proto::v1 as pb;
use tonic::Status;

use super::Shared;
use crate::store::AgentRecord;

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
            patches: Vec::new(),
        }
    }

    /// The patches (with their manifests) that yield `plugin`'s content.
    pub(crate) async fn patch_offers(
        &self,
        plugin: &pb::PluginVersion,
    ) -> Result<Vec<pb::PatchOffer>, Status> {
        let Ok(target) = plugin.sha256.parse::<ContentId>() else {
            return Ok(Vec::new());
        };
        let mut offers = Vec::new();
        for patch in self.store.patches_to(target).await? {
            let Ok(id) = patch.patch_sha256.parse::<ContentId>() else {
                continue;
            };
            // A patch deleted meanwhile has no manifest: not offered.
            if let Ok(manifest) = self.manifest(id).await {
                offers.push(pb::PatchOffer {
                    patch: Some(patch),
                    manifest: Some(manifest.to_proto()),
                });
            }
        }
        Ok(offers)
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
            // A patch: served to agents that may have a version it yields.
            let cached = self.patch_of.get(&id);
            let candidates = if cached.is_some() {
                Vec::new()
            } else {
                self.store.plugins_with_content(id).await?
            };
            if candidates.is_empty() {
                let patch = match cached {
                    Some(p) => Some(p),
                    None => self.store.patch_with_content(id).await?,
                };
                if let Some(patch) = patch {
                    self.patch_of.put(id, patch.clone());
                    let (target, _) =
                        Box::pin(self.resolve_for_agent(agent, "", "", &patch.target_sha256))
                            .await?;
                    let manifest = self.manifest(id).await?;
                    return Ok((target, manifest));
                }
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
    pub(crate) async fn job_for_agent(
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
            let mut info = self.plugin_info(&plugin, &manifest, req.stages.clone(), hints);
            info.patches = self.patch_offers(&plugin).await?;
            plugins.push(info);
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
