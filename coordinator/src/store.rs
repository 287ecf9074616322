//! Durable metadata in one redb file: plugins, manifests, agents, tokens, jobs, the job
//! queue and leases. Every method is one redb transaction (atomic, durable on return);
//! the methods block, so async callers go through [`Store::call`].
//!
//! Records are the protobuf messages of the API where one fits (`PluginVersion`,
//! `Manifest`, `JobDetail`) and JSON for the agent record.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arcade_p2p::labels::Labels;
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use prost::Message as _;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const PLUGINS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("plugins");
const MANIFESTS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("manifests");
const AGENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<'_, &[u8; 32], &str> = TableDefinition::new("agent_tokens");
const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const QUEUE: TableDefinition<'_, u64, &str> = TableDefinition::new("job_queue");
const LEASES: TableDefinition<'_, &str, &str> = TableDefinition::new("job_leases");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// A metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("metadata database error: {0}")]
    Db(String),
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
    /// No such job.
    #[error("job {0} does not exist")]
    JobNotFound(String),
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
    /// The job is not leased to this agent.
    #[error("job {job} is not leased to agent {agent} (its lease expired or it already finished)")]
    NotLeased {
        /// The job.
        job: String,
        /// The agent.
        agent: String,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What a plugin write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new version was stored.
    Created,
    /// The same id@version with the same content was already there.
    Existing,
}

/// A plugin an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
    /// Content SHA-256 (hex).
    pub sha256: String,
}

/// What the coordinator remembers of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One job the lease sweep or a lease call changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Back in the queue.
    Requeued(String),
    /// Out of attempts: failed.
    Failed(String),
}

/// The redb metadata store.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn decode<M: prost::Message + Default>(key: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn decode_agent(key: &str, bytes: &[u8]) -> Result<AgentRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// `id@version`.
pub fn plugin_key(id: &str, version: &str) -> String {
    format!("{id}@{version}")
}

impl Store {
    /// Opens (creating) the database file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(PLUGINS)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(AGENTS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(JOBS)?;
        tx.open_table(QUEUE)?;
        tx.open_table(LEASES)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs a blocking store operation off the async runtime.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Db(format!("store task failed: {e}")))?
    }

    // ---- plugins and manifests ----

    /// Stores a plugin version and its manifest (idempotent for identical content).
    pub fn put_plugin(
        &self,
        plugin: &pb::PluginVersion,
        manifest: &Manifest,
    ) -> Result<PutOutcome, StoreError> {
        let key = plugin_key(&plugin.plugin_id, &plugin.version);
        let tx = self.db.begin_write()?;
        let outcome = {
            let mut plugins = tx.open_table(PLUGINS)?;
            let existing = plugins
                .get(key.as_str())?
                .map(|v| decode::<pb::PluginVersion>(&key, v.value()))
                .transpose()?;
            match existing {
                Some(old) if old.sha256 == plugin.sha256 => PutOutcome::Existing,
                Some(old) => {
                    return Err(StoreError::Conflict {
                        key,
                        existing: old.sha256,
                    });
                }
                None => {
                    plugins.insert(key.as_str(), plugin.encode_to_vec().as_slice())?;
                    let mut manifests = tx.open_table(MANIFESTS)?;
                    let id = manifest.content_id();
                    if manifests.get(id.as_bytes())?.is_none() {
                        manifests.insert(id.as_bytes(), manifest.encode().as_slice())?;
                    }
                    PutOutcome::Created
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// One plugin version.
    pub fn get_plugin(&self, key: &str) -> Result<Option<pb::PluginVersion>, StoreError> {
        let tx = self.db.begin_read()?;
        let plugins = tx.open_table(PLUGINS)?;
        plugins
            .get(key)?
            .map(|v| decode(key, v.value()))
            .transpose()
    }

    /// Every plugin version (optionally of one type), ordered by id@version.
    pub fn list_plugins(&self, plugin_type: &str) -> Result<Vec<pb::PluginVersion>, StoreError> {
        let tx = self.db.begin_read()?;
        let plugins = tx.open_table(PLUGINS)?;
        let mut out = Vec::new();
        for entry in plugins.iter()? {
            let (k, v) = entry?;
            let p: pb::PluginVersion = decode(k.value(), v.value())?;
            if plugin_type.is_empty() || p.plugin_type == plugin_type {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Plugin versions whose content is `id`.
    pub fn plugins_with_content(
        &self,
        id: &ContentId,
    ) -> Result<Vec<pb::PluginVersion>, StoreError> {
        let hex = id.to_hex();
        Ok(self
            .list_plugins("")?
            .into_iter()
            .filter(|p| p.sha256 == hex)
            .collect())
    }

    /// The manifest of a content.
    pub fn get_manifest(&self, id: &ContentId) -> Result<Option<Manifest>, StoreError> {
        let tx = self.db.begin_read()?;
        let manifests = tx.open_table(MANIFESTS)?;
        manifests
            .get(id.as_bytes())?
            .map(|v| {
                Manifest::decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: id.to_hex(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Enables or disables a plugin version.
    pub fn set_enabled(&self, key: &str, enabled: bool) -> Result<pb::PluginVersion, StoreError> {
        let tx = self.db.begin_write()?;
        let plugin = {
            let mut plugins = tx.open_table(PLUGINS)?;
            let mut p: pb::PluginVersion = match plugins.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(StoreError::PluginNotFound(key.to_owned())),
            };
            p.enabled = enabled;
            plugins.insert(key, p.encode_to_vec().as_slice())?;
            p
        };
        tx.commit()?;
        Ok(plugin)
    }

    /// Deletes a plugin version unless queued or running jobs need it. Returns the
    /// content id when no other version uses that content any more (its manifest is
    /// removed too; the caller removes the blob).
    pub fn delete_plugin(&self, key: &str) -> Result<Option<ContentId>, StoreError> {
        let tx = self.db.begin_write()?;
        let orphan = {
            let mut plugins = tx.open_table(PLUGINS)?;
            let p: pb::PluginVersion = match plugins.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(StoreError::PluginNotFound(key.to_owned())),
            };
            let jobs = tx.open_table(JOBS)?;
            let mut active: Vec<String> = Vec::new();
            let queue = tx.open_table(QUEUE)?;
            let leases = tx.open_table(LEASES)?;
            let mut active_ids: Vec<String> = Vec::new();
            for e in queue.iter()? {
                active_ids.push(e?.1.value().to_owned());
            }
            for e in leases.iter()? {
                active_ids.push(e?.0.value().to_owned());
            }
            for job_id in active_ids {
                if let Some(v) = jobs.get(job_id.as_str())? {
                    let job: pb::JobDetail = decode(&job_id, v.value())?;
                    if job
                        .required_plugins
                        .iter()
                        .any(|r| plugin_key(&r.plugin_id, &r.version) == key)
                    {
                        active.push(job_id);
                    }
                }
            }
            if !active.is_empty() {
                active.truncate(5);
                return Err(StoreError::PluginInUse {
                    key: key.to_owned(),
                    jobs: active.join(", "),
                });
            }
            plugins.remove(key)?;
            let mut still_used = false;
            for e in plugins.iter()? {
                let (k, v) = e?;
                let other: pb::PluginVersion = decode(k.value(), v.value())?;
                if other.sha256 == p.sha256 {
                    still_used = true;
                    break;
                }
            }
            if still_used {
                None
            } else {
                let id: ContentId = p.sha256.parse().map_err(|_| StoreError::Corrupt {
                    key: key.to_owned(),
                    reason: "bad sha256".into(),
                })?;
                tx.open_table(MANIFESTS)?.remove(id.as_bytes())?;
                Some(id)
            }
        };
        tx.commit()?;
        Ok(orphan)
    }

    /// Content ids referenced by some plugin version.
    pub fn referenced_contents(&self) -> Result<std::collections::HashSet<ContentId>, StoreError> {
        Ok(self
            .list_plugins("")?
            .into_iter()
            .filter_map(|p| p.sha256.parse().ok())
            .collect())
    }

    // ---- agents ----

    /// Stores an agent and makes `token_hash` its only valid token.
    pub fn register_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut agents = tx.open_table(AGENTS)?;
            let mut tokens = tx.open_table(TOKENS)?;
            let old = agents
                .get(agent.agent_id.as_str())?
                .map(|v| decode_agent(&agent.agent_id, v.value()))
                .transpose()?;
            if let Some(old) = old {
                tokens.remove(&old.token_hash)?;
            }
            let json = serde_json::to_vec(agent).map_err(|e| StoreError::Db(e.to_string()))?;
            agents.insert(agent.agent_id.as_str(), json.as_slice())?;
            tokens.insert(&agent.token_hash, agent.agent_id.as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The agent a token belongs to.
    pub fn agent_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<AgentRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let tokens = tx.open_table(TOKENS)?;
        let Some(id) = tokens.get(token_hash)? else {
            return Ok(None);
        };
        let agents = tx.open_table(AGENTS)?;
        let id = id.value().to_owned();
        agents
            .get(id.as_str())?
            .map(|v| decode_agent(&id, v.value()))
            .transpose()
    }

    /// Replaces an agent's installed-plugin list.
    pub fn set_installed(
        &self,
        agent_id: &str,
        installed: Vec<Installed>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut agents = tx.open_table(AGENTS)?;
            let mut a = match agents.get(agent_id)? {
                Some(v) => decode_agent(agent_id, v.value())?,
                None => return Ok(()),
            };
            a.installed = installed;
            let json = serde_json::to_vec(&a).map_err(|e| StoreError::Db(e.to_string()))?;
            agents.insert(agent_id, json.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every agent.
    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let agents = tx.open_table(AGENTS)?;
        let mut out = Vec::new();
        for e in agents.iter()? {
            let (k, v) = e?;
            out.push(decode_agent(k.value(), v.value())?);
        }
        Ok(out)
    }

    // ---- jobs ----

    fn next_seq(tx: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let mut meta = tx.open_table(META)?;
        let seq = meta.get("queue_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
        meta.insert("queue_seq", seq)?;
        Ok(seq)
    }

    /// Stores a new job and queues it.
    pub fn create_job(&self, job: &pb::JobDetail) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let seq = Self::next_seq(&tx)?;
            tx.open_table(JOBS)?
                .insert(job.job_id.as_str(), job.encode_to_vec().as_slice())?;
            tx.open_table(QUEUE)?.insert(seq, job.job_id.as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// One job.
    pub fn get_job(&self, job_id: &str) -> Result<Option<pb::JobDetail>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        jobs.get(job_id)?
            .map(|v| decode(job_id, v.value()))
            .transpose()
    }

    /// Newest jobs first (job ids are time-ordered), optionally of one status.
    pub fn list_jobs(
        &self,
        status: pb::JobStatus,
        limit: usize,
    ) -> Result<Vec<pb::JobDetail>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for e in jobs.iter()?.rev() {
            let (k, v) = e?;
            let job: pb::JobDetail = decode(k.value(), v.value())?;
            if status == pb::JobStatus::Unspecified || job.status() == status {
                out.push(job);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Leases up to `max` queued jobs, oldest first, among those `eligible` accepts.
    pub fn lease_jobs(
        &self,
        agent_id: &str,
        max: usize,
        now_ms: i64,
        mut eligible: impl FnMut(&pb::JobDetail) -> bool,
    ) -> Result<Vec<pb::JobDetail>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut leased = Vec::new();
        {
            let mut queue = tx.open_table(QUEUE)?;
            let mut jobs = tx.open_table(JOBS)?;
            let mut leases = tx.open_table(LEASES)?;
            let mut taken = Vec::new();
            for e in queue.iter()? {
                let (seq, id) = e?;
                let id = id.value().to_owned();
                let Some(v) = jobs.get(id.as_str())? else {
                    taken.push(seq.value());
                    continue;
                };
                let job: pb::JobDetail = decode(&id, v.value())?;
                drop(v);
                if eligible(&job) {
                    taken.push(seq.value());
                    leased.push(job);
                    if leased.len() >= max {
                        break;
                    }
                }
            }
            for seq in taken {
                queue.remove(seq)?;
            }
            for job in &mut leased {
                job.set_status(pb::JobStatus::Running);
                job.agent_id = agent_id.to_owned();
                job.attempts += 1;
                job.started_at = now_ms;
                jobs.insert(job.job_id.as_str(), job.encode_to_vec().as_slice())?;
                leases.insert(job.job_id.as_str(), agent_id)?;
            }
        }
        tx.commit()?;
        Ok(leased)
    }

    /// Every current lease: job id → agent id.
    pub fn leases(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let tx = self.db.begin_read()?;
        let leases = tx.open_table(LEASES)?;
        let mut out = BTreeMap::new();
        for e in leases.iter()? {
            let (k, v) = e?;
            out.insert(k.value().to_owned(), v.value().to_owned());
        }
        Ok(out)
    }

    /// Ends expired leases: each job goes back to the queue, or fails once it has used
    /// `max_attempts` leases. Leases no longer held by the named agent are skipped.
    pub fn expire_leases(
        &self,
        expired: &[(String, String)],
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<Vec<LeaseChange>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut changes = Vec::new();
        {
            let mut leases = tx.open_table(LEASES)?;
            let mut jobs = tx.open_table(JOBS)?;
            for (job_id, agent_id) in expired {
                let holder = leases.get(job_id.as_str())?.map(|v| v.value().to_owned());
                if holder.as_deref() != Some(agent_id.as_str()) {
                    continue;
                }
                leases.remove(job_id.as_str())?;
                let Some(v) = jobs.get(job_id.as_str())? else {
                    continue;
                };
                let mut job: pb::JobDetail = decode(job_id, v.value())?;
                drop(v);
                if job.attempts >= max_attempts {
                    job.set_status(pb::JobStatus::Failed);
                    job.finished_at = now_ms;
                    job.error_message = format!(
                        "lease expired {} time(s): agent {} stopped heart-beating; giving up after jobs.max_attempts = {}",
                        job.attempts, agent_id, max_attempts
                    );
                    changes.push(LeaseChange::Failed(job_id.clone()));
                } else {
                    job.set_status(pb::JobStatus::Queued);
                    job.error_message = format!("lease of agent {agent_id} expired; re-queued");
                    let seq = Self::next_seq(&tx)?;
                    tx.open_table(QUEUE)?.insert(seq, job_id.as_str())?;
                    changes.push(LeaseChange::Requeued(job_id.clone()));
                }
                jobs.insert(job_id.as_str(), job.encode_to_vec().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(changes)
    }

    /// Records the final result of a job leased to `agent_id`.
    pub fn complete_job(
        &self,
        agent_id: &str,
        job_id: &str,
        apply: impl FnOnce(&mut pb::JobDetail),
    ) -> Result<pb::JobDetail, StoreError> {
        let tx = self.db.begin_write()?;
        let job = {
            let mut leases = tx.open_table(LEASES)?;
            let holder = leases.get(job_id)?.map(|v| v.value().to_owned());
            if holder.as_deref() != Some(agent_id) {
                return Err(StoreError::NotLeased {
                    job: job_id.to_owned(),
                    agent: agent_id.to_owned(),
                });
            }
            leases.remove(job_id)?;
            let mut jobs = tx.open_table(JOBS)?;
            let mut job: pb::JobDetail = match jobs.get(job_id)? {
                Some(v) => decode(job_id, v.value())?,
                None => return Err(StoreError::JobNotFound(job_id.to_owned())),
            };
            apply(&mut job);
            jobs.insert(job_id, job.encode_to_vec().as_slice())?;
            job
        };
        tx.commit()?;
        Ok(job)
    }
}
