//! The coordinator's durable metadata behind one trait, [`MetaStore`]: plugins,
//! manifests, agents and their tokens, jobs, leases and the record of finished jobs.
//! [`RedbStore`](redb::RedbStore) (one redb file, writes group-committed) is the embedded
//! default; a shared SQL store for several coordinators implements the same trait.
//!
//! The trait is shaped for several processes sharing one store:
//! - every write is one self-contained operation that checks its own precondition
//!   (`claim_job` leases a job only if it is still queued — claim-with-skip: a loser gets
//!   `None` and moves on; `complete_job` only if the caller still holds the lease), so
//!   no caller ever runs code inside a store transaction;
//! - deciding *which* job an agent should take is not the store's business: the
//!   coordinator keeps its queue, waiters and label indexes in memory
//!   (`crate::dispatch`), rebuilt at start from [`MetaStore::queued_jobs`];
//! - every write is durable when its future resolves (before the RPC is acknowledged).

pub mod redb;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arcade_p2p::labels::Labels;
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use serde::{Deserialize, Serialize};

pub use self::redb::RedbStore;

/// A metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (shared by every operation of a failed group commit).
    #[error("metadata database error: {0}")]
    Db(#[source] Arc<::redb::Error>),
    /// Another write of the same group commit failed, so none of them was committed.
    #[error("metadata write not committed: another write of its batch failed; retry")]
    Aborted,
    /// The store's writer is gone (the coordinator is stopping).
    #[error("metadata store is shut down")]
    Closed,
    /// A stored record cannot be decoded.
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
    /// Same id@version, other content.
    #[error(
        "plugin {key} already exists with other content (sha256 {existing}); push a new version"
    )]
    Conflict {
        /// id@version.
        key: String,
        /// The stored content.
        existing: String,
    },
    /// No such plugin version.
    #[error("plugin {0} does not exist")]
    PluginNotFound(String),
    /// A patch's base or target content is no longer stored.
    #[error("content {0} of a patch is no longer stored")]
    PatchOrphaned(String),
    /// No such job.
    #[error("job {0} does not exist")]
    JobNotFound(String),
    /// No such agent.
    #[error("agent {0} is not registered")]
    AgentNotFound(String),
    /// The plugin is still needed by queued or running jobs.
    #[error(
        "plugin {key} is needed by queued or running jobs ({jobs}); wait for them or disable it instead"
    )]
    PluginInUse {
        /// id@version.
        key: String,
        /// Some of the jobs.
        jobs: String,
    },
    /// No such enrolment token.
    #[error("enrolment token {0} does not exist (it was revoked)")]
    EnrollTokenNotFound(String),
    /// The enrolment token cannot enrol another agent.
    #[error("enrolment token {id} {reason}")]
    EnrollTokenSpent {
        /// Its id.
        id: String,
        /// Why (expired, used up).
        reason: String,
    },
    /// The agent id is bound to another key.
    #[error("agent {agent} is bound to another key (peer {peer})")]
    BoundToOtherKey {
        /// The agent.
        agent: String,
        /// The peer id it is bound to.
        peer: String,
    },
    /// A registration proof not later than the last one accepted.
    #[error(
        "registration of agent {agent} is signed at {signed_at_ms}, not after the last accepted one ({last_ms}): a replayed request, or the agent's clock went back"
    )]
    Replayed {
        /// The agent.
        agent: String,
        /// This proof's time.
        signed_at_ms: i64,
        /// The last accepted proof's time.
        last_ms: i64,
    },
    /// The job is not leased to this agent.
    #[error("job {job} is not leased to agent {agent} (its lease expired or it already finished)")]
    NotLeased {
        /// The job.
        job: String,
        /// The agent.
        agent: String,
    },
}

impl<E: Into<::redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(Arc::new(e.into()))
    }
}

/// What a plugin write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new version was stored.
    Created,
    /// The same id@version with the same content was already there.
    Existing,
}

/// A plugin an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Installed {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
    /// Content SHA-256 (hex).
    pub sha256: String,
}

/// What the coordinator remembers of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent id.
    pub agent_id: String,
    /// Host name it reported.
    pub hostname: String,
    /// Its labels.
    pub labels: Labels,
    /// libp2p peer id.
    pub peer_id: String,
    /// libp2p addresses.
    pub addrs: Vec<String>,
    /// Agent software version.
    pub agent_version: String,
    /// Plugins it holds.
    pub installed: Vec<Installed>,
    /// Unix ms of the last Register.
    pub registered_at: i64,
    /// SHA-256 of its current token.
    pub token_hash: [u8; 32],
    /// The key the id is bound to, as a peer id (empty: enrolled before keys were
    /// bound; bound at its next Register).
    #[serde(default)]
    pub key_id: String,
    /// `signed_at_ms` of the last Register accepted: a later one must be signed later.
    #[serde(default)]
    pub proof_at: i64,
    /// Labels its enrolment token(s) granted (kept across re-registrations).
    #[serde(default)]
    pub granted: Labels,
}

/// An enrolment token created by the admin: the labels it grants and its limits. The
/// token itself is stored only as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollGrant {
    /// Short public id (for list and revoke).
    pub id: String,
    /// SHA-256 of the secret token.
    pub token_hash: [u8; 32],
    /// Labels an agent enrolled with it carries.
    pub labels: Labels,
    /// Agent ids it may enrol (`*` = any run of characters; empty = any).
    pub id_pattern: String,
    /// Unix ms (0 = never).
    pub expires_at: i64,
    /// New agent ids it may enrol (0 = unlimited).
    pub max_uses: u32,
    /// New agent ids it enrolled.
    pub uses: u32,
    /// The admin's note.
    pub note: String,
    /// Unix ms.
    pub created_at: i64,
}

impl EnrollGrant {
    /// Why it cannot enrol a new agent at `now_ms`, if it cannot.
    pub fn spent(&self, now_ms: i64) -> Option<String> {
        if self.expires_at != 0 && now_ms >= self.expires_at {
            Some(format!("expired at {} (unix ms)", self.expires_at))
        } else if self.max_uses != 0 && self.uses >= self.max_uses {
            Some(format!(
                "is used up ({} of {} uses)",
                self.uses, self.max_uses
            ))
        } else {
            None
        }
    }

    /// Whether `agent_id` matches its id pattern.
    pub fn admits_id(&self, agent_id: &str) -> bool {
        self.id_pattern.is_empty() || glob_match(&self.id_pattern, agent_id)
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

/// One job the lease sweep, an agent removal or a cancel changed.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseChange {
    /// Back in the queue (the job as stored now).
    Requeued(Box<pb::JobDetail>),
    /// Out of attempts: failed.
    Failed(String),
    /// Its cancel had been asked for: cancelled.
    Cancelled(String),
}

/// The final result an agent reports for a leased job.
#[derive(Debug, Clone, Default)]
pub struct JobOutcome {
    /// `Succeeded` or `Failed` (a job whose cancel was asked for ends `Cancelled`).
    pub status: pb::JobStatus,
    /// Exit code of the last command.
    pub exit_code: i32,
    /// Output tail (already bounded).
    pub output_tail: String,
    /// Error message (already bounded).
    pub error_message: String,
    /// Per plugin and stage.
    pub plugin_results: Vec<pb::PluginExecutionResult>,
    /// Unix ms (0 = keep the lease time).
    pub started_at: i64,
    /// Unix ms.
    pub finished_at: i64,
}

/// What `cancel_job` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// It was queued: now cancelled, never to be leased.
    Cancelled(pb::JobDetail),
    /// It is running on `agent_id`: the cancel is recorded for its agent to act on.
    Requested(pb::JobDetail),
    /// It had already finished: unchanged.
    Finished(pb::JobDetail),
}

/// What removing an agent did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemovedAgent {
    /// What happened to each job it held: queued again, or ended (its cancel had been
    /// asked for, or it was out of attempts).
    pub changes: Vec<LeaseChange>,
}

/// See [`MetaStore::released_probe`].
pub struct ReleaseProbe(pub Box<dyn Fn() -> bool + Send + Sync>);

impl ReleaseProbe {
    /// Whether the database is released.
    pub fn released(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for ReleaseProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReleaseProbe")
            .field(&self.released())
            .finish()
    }
}

/// The coordinator's durable metadata. Every write is durable when it returns.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + std::fmt::Debug + 'static {
    /// A probe that answers whether every handle on the underlying database is gone —
    /// reads still running on the blocking pool for a caller that went away included —
    /// so that the same files may be opened again (a restart). Stores without such
    /// handles answer `true`.
    fn released_probe(&self) -> ReleaseProbe {
        ReleaseProbe(Box::new(|| true))
    }

    // ---- plugins and manifests ----

    /// Stores a plugin version and its manifest (idempotent for identical content).
    async fn put_plugin(
        &self,
        plugin: pb::PluginVersion,
        manifest: Arc<Manifest>,
    ) -> Result<PutOutcome, StoreError>;
    /// One plugin version by `id@version`.
    async fn get_plugin(&self, key: &str) -> Result<Option<pb::PluginVersion>, StoreError>;
    /// Every plugin version (optionally of one type), ordered by id@version.
    async fn list_plugins(&self, plugin_type: &str) -> Result<Vec<pb::PluginVersion>, StoreError>;
    /// Every version of one plugin id (enabled or not), in no particular order.
    async fn versions_of(&self, plugin_id: &str) -> Result<Vec<pb::PluginVersion>, StoreError>;
    /// Plugin versions whose content is `id`.
    async fn plugins_with_content(
        &self,
        id: ContentId,
    ) -> Result<Vec<pb::PluginVersion>, StoreError>;
    /// The manifest of a content.
    async fn get_manifest(&self, id: ContentId) -> Result<Option<Manifest>, StoreError>;
    /// Enables or disables a plugin version.
    async fn set_enabled(&self, key: &str, enabled: bool) -> Result<pb::PluginVersion, StoreError>;
    /// Deletes a plugin version unless queued or running jobs need it. Returns the
    /// contents nothing references any more, for the caller to remove their blobs: the
    /// version's content when no other version uses it (its manifest is removed too),
    /// and the patches from or to that content (removed with it).
    async fn delete_plugin(&self, key: &str) -> Result<Vec<ContentId>, StoreError>;
    /// Content ids referenced by some plugin version or patch.
    async fn referenced_contents(&self) -> Result<HashSet<ContentId>, StoreError>;

    // ---- patches ----

    /// Stores a patch and its manifest (replacing one for the same base and target).
    /// Refused (`PatchOrphaned`) when the base's or the target's content is no longer
    /// stored: a delete won the race.
    async fn put_patch(
        &self,
        patch: pb::PatchInfo,
        manifest: Arc<Manifest>,
    ) -> Result<(), StoreError>;
    /// The patches that yield content `target`.
    async fn patches_to(&self, target: ContentId) -> Result<Vec<pb::PatchInfo>, StoreError>;
    /// The patch whose own content is `patch` (scans the patches).
    async fn patch_with_content(
        &self,
        patch: ContentId,
    ) -> Result<Option<pb::PatchInfo>, StoreError>;

    // ---- agents ----

    /// Stores an agent and makes `token_hash` its only valid token.
    /// Stores an agent record (replacing its old token). Refused when the id is bound
    /// to another key (`BoundToOtherKey`: another non-empty `peer_id`) or the record's
    /// `proof_at` is not later than the stored one (`Replayed`).
    async fn put_agent(&self, agent: AgentRecord) -> Result<(), StoreError>;
    /// Replaces an agent's installed-plugin list.
    async fn set_installed(
        &self,
        agent_id: &str,
        installed: Vec<Installed>,
    ) -> Result<(), StoreError>;
    /// Forgets an agent and its token; the jobs leased to it are re-queued (or end,
    /// when cancelled or out of `max_attempts`).
    async fn remove_agent(
        &self,
        agent_id: &str,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<RemovedAgent, StoreError>;
    /// Every agent.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    // ---- enrolment tokens ----

    /// Stores a new enrolment token.
    async fn put_enroll_grant(&self, grant: EnrollGrant) -> Result<(), StoreError>;
    /// Every enrolment token.
    async fn list_enroll_grants(&self) -> Result<Vec<EnrollGrant>, StoreError>;
    /// Revokes one; `EnrollTokenNotFound` when there is none.
    async fn remove_enroll_grant(&self, id: &str) -> Result<EnrollGrant, StoreError>;
    /// Counts one enrolment of a new agent against token `id` if it is neither expired
    /// nor used up at `now_ms` (`EnrollTokenSpent` otherwise); the updated token.
    async fn use_enroll_grant(&self, id: &str, now_ms: i64) -> Result<EnrollGrant, StoreError>;

    // ---- jobs ----

    /// Stores a new, queued job.
    async fn create_job(&self, job: pb::JobDetail) -> Result<(), StoreError>;
    /// One job.
    async fn get_job(&self, job_id: &str) -> Result<Option<pb::JobDetail>, StoreError>;
    /// Newest jobs first, optionally of one status.
    async fn list_jobs(
        &self,
        status: pb::JobStatus,
        limit: usize,
    ) -> Result<Vec<pb::JobDetail>, StoreError>;
    /// Every queued job, oldest first (to rebuild the in-memory queue at start).
    async fn queued_jobs(&self) -> Result<Vec<pb::JobDetail>, StoreError>;
    /// Every current lease: job id → agent id.
    async fn leases(&self) -> Result<BTreeMap<String, String>, StoreError>;
    /// Leases a job to `agent_id` if it is still queued (`None` when another caller
    /// got it first or it was cancelled): one write.
    async fn claim_job(
        &self,
        job_id: &str,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<pb::JobDetail>, StoreError>;
    /// Records the final result of a job leased to `agent_id`.
    async fn complete_job(
        &self,
        agent_id: &str,
        job_id: &str,
        outcome: JobOutcome,
    ) -> Result<pb::JobDetail, StoreError>;
    /// Ends expired leases (`(job, agent)` pairs; pairs whose lease moved on are
    /// skipped): each job is re-queued, or fails once it has used `max_attempts`, or is
    /// cancelled when that was asked for.
    async fn expire_leases(
        &self,
        expired: Vec<(String, String)>,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<Vec<LeaseChange>, StoreError>;
    /// Cancels a queued job, or records the cancel of a running one.
    async fn cancel_job(&self, job_id: &str, now_ms: i64) -> Result<CancelOutcome, StoreError>;
    /// Fails every queued job that requires plugin `key` (it was disabled), with
    /// `reason`; returns their ids.
    async fn fail_queued_needing(
        &self,
        key: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes up to `limit` jobs that finished before `before_ms`; returns how many.
    async fn delete_finished(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError>;
}

/// `id@version`.
pub fn plugin_key(id: &str, version: &str) -> String {
    format!("{id}@{version}")
}
