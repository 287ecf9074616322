//! [`RedbStore`]: the embedded [`MetaStore`] in one redb file.
//!
//! Writes go through one writer thread that **group-commits**: it takes every operation
//! waiting in its (bounded) queue — up to [`MAX_BATCH`] — applies them in one write
//! transaction and commits it once, durably (fsync), before any of them is answered. So
//! hundreds of job transitions a second cost a few fsyncs, and a caller is answered only
//! once its write is on disk. Each operation checks its own precondition before it writes
//! anything, so an operation refused for a logical reason (`NotLeased`, …) leaves no
//! trace in the shared transaction; a database error fails every operation of its batch
//! (nothing of that batch is committed). Reads are redb read transactions (MVCC, never
//! blocked by the writer) on the blocking pool.
//!
//! Records are the protobuf messages of the API where one fits (`PluginVersion`,
//! `Manifest`, `JobDetail`) and JSON for the agent record.
//!
//! | table | key → value |
//! |---|---|
//! | `plugins` | id@version → `PluginVersion` |
//! | `manifests` | sha256 → encoded `Manifest` |
//! | `agents` | agent id → JSON `AgentRecord` |
//! | `agent_tokens` | token SHA-256 → agent id |
//! | `jobs` | job id (UUIDv7: time-ordered) → `JobDetail` |
//! | `queued_jobs` | job id → () for every queued job |
//! | `job_leases` | job id → agent id for every running job |
//! | `finished_jobs` | (finished_at ms, job id) → () for retention |
//! | `enroll_tokens` | token id → JSON `EnrollGrant` |
//! | `meta` | `schema` → 2 |

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use prost::Message as _;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    AgentRecord, CancelOutcome, EnrollGrant, Installed, JobOutcome, LeaseChange, MetaStore,
    PutOutcome, RemovedAgent, StoreError, plugin_key,
};
use crate::metrics::StoreMetrics;

const PLUGINS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("plugins");
const MANIFESTS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("manifests");
/// `target hex` + `:` + `base hex` → encoded `PatchInfo` (a range over `target hex:`
/// lists the patches to a target).
const PATCHES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("patches");
const AGENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<'_, &[u8; 32], &str> = TableDefinition::new("agent_tokens");
const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const QUEUED: TableDefinition<'_, &str, ()> = TableDefinition::new("queued_jobs");
const LEASES: TableDefinition<'_, &str, &str> = TableDefinition::new("job_leases");
const FINISHED: TableDefinition<'_, (i64, &str), ()> = TableDefinition::new("finished_jobs");
const GRANTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("enroll_tokens");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The queue of schema 1 (sequence → job id), migrated into `queued_jobs` at open.
const LEGACY_QUEUE: TableDefinition<'_, u64, &str> = TableDefinition::new("job_queue");

const SCHEMA: u64 = 2;
/// Most operations in one group commit.
pub const MAX_BATCH: usize = 512;
/// Operations waiting for the writer; callers wait (backpressure) beyond this.
const QUEUE_DEPTH: usize = 8192;

type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// One write: run against the batch's transaction (or told why there is none); returns
/// how to answer its caller once the commit is known, and whether it failed in a way
/// that may have left part of its writes behind (then the whole batch is aborted).
type Op = Box<dyn FnOnce(Result<&WriteTransaction, StoreError>) -> (Finish, bool) + Send>;

/// The redb metadata store (cheap to clone: all clones share the database and writer).
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    ops: mpsc::Sender<(&'static str, Op)>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
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

fn decode_grant(key: &str, bytes: &[u8]) -> Result<EnrollGrant, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: format!("enroll token {key}"),
        reason: e.to_string(),
    })
}

fn encode_grant(grant: &EnrollGrant) -> Vec<u8> {
    serde_json::to_vec(grant).unwrap_or_default()
}

fn encode_agent(agent: &AgentRecord) -> Vec<u8> {
    // A struct of strings, maps and byte arrays always serialises.
    serde_json::to_vec(agent).unwrap_or_default()
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Db(inner) => StoreError::Db(inner.clone()),
        StoreError::Aborted => StoreError::Aborted,
        _ => StoreError::Closed,
    }
}

fn is_final(status: pb::JobStatus) -> bool {
    matches!(
        status,
        pb::JobStatus::Succeeded | pb::JobStatus::Failed | pb::JobStatus::Cancelled
    )
}

impl RedbStore {
    /// Opens (creating) the database file with a page cache of `cache_bytes`, migrates
    /// an older schema and starts the writer thread. Blocking.
    pub fn open(
        path: &Path,
        cache_bytes: usize,
        metrics: StoreMetrics,
    ) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            // Best effort: the metadata holds token hashes.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let tx = db.begin_write()?;
        tx.open_table(PLUGINS)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(PATCHES)?;
        tx.open_table(AGENTS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(JOBS)?;
        tx.open_table(QUEUED)?;
        tx.open_table(LEASES)?;
        tx.open_table(FINISHED)?;
        tx.open_table(GRANTS)?;
        let schema = tx.open_table(META)?.get("schema")?.map(|v| v.value());
        if schema.is_none_or(|s| s < SCHEMA) {
            migrate_v1(&tx)?;
            tx.open_table(META)?.insert("schema", SCHEMA)?;
        }
        tx.commit()?;
        let db = Arc::new(db);
        let (ops, rx) = mpsc::channel(QUEUE_DEPTH);
        // The writer holds the database weakly: it closes when the last store handle
        // is dropped (not when the writer thread gets round to ending), so a restart in
        // the same process can open the file again at once.
        let writer_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(writer_db, rx, metrics))
            .map_err(|e| StoreError::Db(Arc::new(redb::Error::Io(e))))?;
        Ok(Self { db, ops })
    }

    /// Runs one write operation in the next group commit; answers once it is durable.
    async fn write<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op_fn: Op = Box::new(move |tx| {
            let result = tx.and_then(f);
            let torn = matches!(
                result,
                Err(StoreError::Db(_) | StoreError::Corrupt { .. } | StoreError::Closed)
            );
            let finish: Finish = Box::new(move |commit: Result<(), StoreError>| {
                let _ = reply.send(match (result, commit) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(e),
                    (Ok(v), Ok(())) => Ok(v),
                });
            });
            (finish, torn)
        });
        self.ops
            .send((op, op_fn))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a read transaction on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read()?;
            f(&tx)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

/// The writer thread: group commits until every sender is gone.
fn writer(
    db: std::sync::Weak<Database>,
    mut rx: mpsc::Receiver<(&'static str, Op)>,
    metrics: StoreMetrics,
) {
    let mut batch: Vec<(&'static str, Op)> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let Some(db) = db.upgrade() else {
            // Every handle is gone; answering is moot (their callers are gone too).
            batch.clear();
            break;
        };
        let tx = db.begin_write().map_err(StoreError::from);
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        let mut torn = false;
        for (name, op) in batch.drain(..) {
            metrics.writes(name).inc();
            let (finish, op_torn) = op(tx.as_ref().map_err(clone_err));
            torn |= op_torn;
            finishers.push(finish);
        }
        let commit = match tx {
            Err(e) => Err(e),
            Ok(tx) if torn => {
                let _ = tx.abort();
                Err(StoreError::Aborted)
            }
            Ok(tx) => {
                metrics.commits.inc();
                tx.commit().map_err(StoreError::from)
            }
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, ops = finishers.len(), "metadata store: batch not committed");
        }
        for finish in finishers {
            finish(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(clone_err(e)),
            });
        }
    }
}

/// Schema 1 → 2: the sequence-keyed queue becomes `queued_jobs`, and finished jobs get
/// their retention entries.
fn migrate_v1(tx: &WriteTransaction) -> Result<(), StoreError> {
    let legacy: Vec<String> = match tx.open_table(LEGACY_QUEUE) {
        Ok(t) => {
            let mut ids = Vec::new();
            for e in t.iter()? {
                ids.push(e?.1.value().to_owned());
            }
            ids
        }
        Err(e) => return Err(e.into()),
    };
    {
        let mut queued = tx.open_table(QUEUED)?;
        for id in &legacy {
            queued.insert(id.as_str(), ())?;
        }
    }
    tx.delete_table(LEGACY_QUEUE)?;
    let jobs = tx.open_table(JOBS)?;
    let mut finished = tx.open_table(FINISHED)?;
    for e in jobs.iter()? {
        let (k, v) = e?;
        let job: pb::JobDetail = decode(k.value(), v.value())?;
        if is_final(job.status()) {
            finished.insert((job.finished_at, k.value()), ())?;
        }
    }
    Ok(())
}

fn load_job(tx: &WriteTransaction, job_id: &str) -> Result<Option<pb::JobDetail>, StoreError> {
    let jobs = tx.open_table(JOBS)?;
    jobs.get(job_id)?
        .map(|v| decode(job_id, v.value()))
        .transpose()
}

fn save_job(tx: &WriteTransaction, job: &pb::JobDetail) -> Result<(), StoreError> {
    tx.open_table(JOBS)?
        .insert(job.job_id.as_str(), job.encode_to_vec().as_slice())?;
    Ok(())
}

/// Marks `job` finished now with `status` and records it for retention.
fn finish_job(
    tx: &WriteTransaction,
    job: &mut pb::JobDetail,
    status: pb::JobStatus,
    now_ms: i64,
) -> Result<(), StoreError> {
    job.set_status(status);
    if job.finished_at == 0 {
        job.finished_at = now_ms;
    }
    tx.open_table(FINISHED)?
        .insert((job.finished_at, job.job_id.as_str()), ())?;
    save_job(tx, job)
}

/// Ends the lease of `job_id` held by `agent_id` (already removed from `job_leases`):
/// cancelled if asked for, failed when out of attempts, else queued again.
fn end_lease(
    tx: &WriteTransaction,
    job_id: &str,
    agent_id: &str,
    why: &str,
    max_attempts: u32,
    now_ms: i64,
) -> Result<Option<LeaseChange>, StoreError> {
    let Some(mut job) = load_job(tx, job_id)? else {
        return Ok(None);
    };
    if job.cancel_requested {
        job.error_message = format!("cancelled by an admin; {why}");
        finish_job(tx, &mut job, pb::JobStatus::Cancelled, now_ms)?;
        return Ok(Some(LeaseChange::Cancelled(job_id.to_owned())));
    }
    if job.attempts >= max_attempts {
        job.error_message = format!(
            "{why} {} time(s) (last agent {agent_id}); giving up after jobs.max_attempts = {max_attempts}",
            job.attempts
        );
        finish_job(tx, &mut job, pb::JobStatus::Failed, now_ms)?;
        return Ok(Some(LeaseChange::Failed(job_id.to_owned())));
    }
    job.set_status(pb::JobStatus::Queued);
    job.error_message = format!("{why} (agent {agent_id}); re-queued");
    save_job(tx, &job)?;
    tx.open_table(QUEUED)?.insert(job_id, ())?;
    Ok(Some(LeaseChange::Requeued(Box::new(job))))
}

#[async_trait::async_trait]
impl MetaStore for RedbStore {
    fn released_probe(&self) -> super::ReleaseProbe {
        let db = Arc::downgrade(&self.db);
        super::ReleaseProbe(Box::new(move || db.strong_count() == 0))
    }

    async fn put_plugin(
        &self,
        plugin: pb::PluginVersion,
        manifest: Arc<Manifest>,
    ) -> Result<PutOutcome, StoreError> {
        self.write("put_plugin", move |tx| {
            let key = plugin_key(&plugin.plugin_id, &plugin.version);
            let mut plugins = tx.open_table(PLUGINS)?;
            let existing = plugins
                .get(key.as_str())?
                .map(|v| decode::<pb::PluginVersion>(&key, v.value()))
                .transpose()?;
            match existing {
                Some(old) if old.sha256 == plugin.sha256 => Ok(PutOutcome::Existing),
                Some(old) => Err(StoreError::Conflict {
                    key,
                    existing: old.sha256,
                }),
                None => {
                    plugins.insert(key.as_str(), plugin.encode_to_vec().as_slice())?;
                    let mut manifests = tx.open_table(MANIFESTS)?;
                    let id = manifest.content_id();
                    if manifests.get(id.as_bytes())?.is_none() {
                        manifests.insert(id.as_bytes(), manifest.encode().as_slice())?;
                    }
                    Ok(PutOutcome::Created)
                }
            }
        })
        .await
    }

    async fn get_plugin(&self, key: &str) -> Result<Option<pb::PluginVersion>, StoreError> {
        let key = key.to_owned();
        self.read(move |tx| {
            let plugins = tx.open_table(PLUGINS)?;
            plugins
                .get(key.as_str())?
                .map(|v| decode(&key, v.value()))
                .transpose()
        })
        .await
    }

    async fn list_plugins(&self, plugin_type: &str) -> Result<Vec<pb::PluginVersion>, StoreError> {
        let plugin_type = plugin_type.to_owned();
        self.read(move |tx| list_plugins(tx, &plugin_type)).await
    }

    async fn versions_of(&self, plugin_id: &str) -> Result<Vec<pb::PluginVersion>, StoreError> {
        // Keys are `id@version` and ids hold no `@`: one range, `id@` up to `id` + the
        // character after `@`.
        let (from, to) = (format!("{plugin_id}@"), format!("{plugin_id}A"));
        self.read(move |tx| {
            let plugins = tx.open_table(PLUGINS)?;
            let mut out = Vec::new();
            for entry in plugins.range(from.as_str()..to.as_str())? {
                let (k, v) = entry?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn plugins_with_content(
        &self,
        id: ContentId,
    ) -> Result<Vec<pb::PluginVersion>, StoreError> {
        let hex = id.to_hex();
        self.read(move |tx| {
            Ok(list_plugins(tx, "")?
                .into_iter()
                .filter(|p| p.sha256 == hex)
                .collect())
        })
        .await
    }

    async fn get_manifest(&self, id: ContentId) -> Result<Option<Manifest>, StoreError> {
        self.read(move |tx| {
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
        })
        .await
    }

    async fn set_enabled(&self, key: &str, enabled: bool) -> Result<pb::PluginVersion, StoreError> {
        let key = key.to_owned();
        self.write("set_enabled", move |tx| {
            let mut plugins = tx.open_table(PLUGINS)?;
            let mut p: pb::PluginVersion = match plugins.get(key.as_str())? {
                Some(v) => decode(&key, v.value())?,
                None => return Err(StoreError::PluginNotFound(key)),
            };
            p.enabled = enabled;
            plugins.insert(key.as_str(), p.encode_to_vec().as_slice())?;
            Ok(p)
        })
        .await
    }

    async fn delete_plugin(&self, key: &str) -> Result<Vec<ContentId>, StoreError> {
        let key = key.to_owned();
        self.write("delete_plugin", move |tx| {
            let mut plugins = tx.open_table(PLUGINS)?;
            let p: pb::PluginVersion = match plugins.get(key.as_str())? {
                Some(v) => decode(&key, v.value())?,
                None => return Err(StoreError::PluginNotFound(key)),
            };
            let mut active_ids: Vec<String> = Vec::new();
            for e in tx.open_table(QUEUED)?.iter()? {
                active_ids.push(e?.0.value().to_owned());
            }
            for e in tx.open_table(LEASES)?.iter()? {
                active_ids.push(e?.0.value().to_owned());
            }
            let jobs = tx.open_table(JOBS)?;
            let mut active: Vec<String> = Vec::new();
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
                    key,
                    jobs: active.join(", "),
                });
            }
            let mut still_used = false;
            for e in plugins.iter()? {
                let (k, v) = e?;
                if k.value() == key {
                    continue;
                }
                let other: pb::PluginVersion = decode(k.value(), v.value())?;
                if other.sha256 == p.sha256 {
                    still_used = true;
                    break;
                }
            }
            let id: ContentId = p.sha256.parse().map_err(|_| StoreError::Corrupt {
                key: key.clone(),
                reason: "bad sha256".into(),
            })?;
            plugins.remove(key.as_str())?;
            if still_used {
                return Ok(Vec::new());
            }
            let mut manifests = tx.open_table(MANIFESTS)?;
            manifests.remove(id.as_bytes())?;
            let mut gone = vec![id];
            // Patches from or to the content go with it.
            let hex = id.to_hex();
            let mut patches = tx.open_table(PATCHES)?;
            let mut dead = Vec::new();
            for e in patches.iter()? {
                let (k, v) = e?;
                let p: pb::PatchInfo = decode(k.value(), v.value())?;
                if p.base_sha256 == hex || p.target_sha256 == hex {
                    dead.push((k.value().to_owned(), p.patch_sha256));
                }
            }
            for (k, patch) in dead {
                patches.remove(k.as_str())?;
                if let Ok(pid) = patch.parse::<ContentId>() {
                    manifests.remove(pid.as_bytes())?;
                    gone.push(pid);
                }
            }
            Ok(gone)
        })
        .await
    }

    async fn referenced_contents(&self) -> Result<HashSet<ContentId>, StoreError> {
        self.read(|tx| {
            let mut refs: HashSet<ContentId> = list_plugins(tx, "")?
                .into_iter()
                .filter_map(|p| p.sha256.parse().ok())
                .collect();
            for e in tx.open_table(PATCHES)?.iter()? {
                let (k, v) = e?;
                let p: pb::PatchInfo = decode(k.value(), v.value())?;
                refs.extend(p.patch_sha256.parse::<ContentId>().ok());
            }
            Ok(refs)
        })
        .await
    }

    async fn put_patch(
        &self,
        patch: pb::PatchInfo,
        manifest: Arc<Manifest>,
    ) -> Result<(), StoreError> {
        self.write("put_patch", move |tx| {
            let mut manifests = tx.open_table(MANIFESTS)?;
            for sha in [&patch.base_sha256, &patch.target_sha256] {
                let id: ContentId = sha
                    .parse()
                    .map_err(|_| StoreError::PatchOrphaned(sha.clone()))?;
                if manifests.get(id.as_bytes())?.is_none() {
                    return Err(StoreError::PatchOrphaned(sha.clone()));
                }
            }
            let id = manifest.content_id();
            if manifests.get(id.as_bytes())?.is_none() {
                manifests.insert(id.as_bytes(), manifest.encode().as_slice())?;
            }
            let key = format!("{}:{}", patch.target_sha256, patch.base_sha256);
            tx.open_table(PATCHES)?
                .insert(key.as_str(), patch.encode_to_vec().as_slice())?;
            Ok(())
        })
        .await
    }

    async fn patch_with_content(
        &self,
        patch: ContentId,
    ) -> Result<Option<pb::PatchInfo>, StoreError> {
        let hex = patch.to_hex();
        self.read(move |tx| {
            for e in tx.open_table(PATCHES)?.iter()? {
                let (k, v) = e?;
                let p: pb::PatchInfo = decode(k.value(), v.value())?;
                if p.patch_sha256 == hex {
                    return Ok(Some(p));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn patches_to(&self, target: ContentId) -> Result<Vec<pb::PatchInfo>, StoreError> {
        // Keys are `target:base` in hex: one range, `target:` up to `target;`.
        let (from, to) = (
            format!("{}:", target.to_hex()),
            format!("{};", target.to_hex()),
        );
        self.read(move |tx| {
            let patches = tx.open_table(PATCHES)?;
            let mut out = Vec::new();
            for e in patches.range(from.as_str()..to.as_str())? {
                let (k, v) = e?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_agent(&self, agent: AgentRecord) -> Result<(), StoreError> {
        self.write("put_agent", move |tx| {
            let mut agents = tx.open_table(AGENTS)?;
            let mut tokens = tx.open_table(TOKENS)?;
            let old = agents
                .get(agent.agent_id.as_str())?
                .map(|v| decode_agent(&agent.agent_id, v.value()))
                .transpose()?;
            if let Some(old) = old {
                if !old.key_id.is_empty() && old.key_id != agent.key_id {
                    return Err(StoreError::BoundToOtherKey {
                        agent: agent.agent_id,
                        peer: old.key_id,
                    });
                }
                if agent.proof_at != 0 && agent.proof_at <= old.proof_at {
                    return Err(StoreError::Replayed {
                        agent: agent.agent_id,
                        signed_at_ms: agent.proof_at,
                        last_ms: old.proof_at,
                    });
                }
                tokens.remove(&old.token_hash)?;
            }
            agents.insert(agent.agent_id.as_str(), encode_agent(&agent).as_slice())?;
            tokens.insert(&agent.token_hash, agent.agent_id.as_str())?;
            Ok(())
        })
        .await
    }

    async fn set_installed(
        &self,
        agent_id: &str,
        installed: Vec<Installed>,
    ) -> Result<(), StoreError> {
        let agent_id = agent_id.to_owned();
        self.write("set_installed", move |tx| {
            let mut agents = tx.open_table(AGENTS)?;
            let mut a = match agents.get(agent_id.as_str())? {
                Some(v) => decode_agent(&agent_id, v.value())?,
                None => return Ok(()),
            };
            a.installed = installed;
            agents.insert(agent_id.as_str(), encode_agent(&a).as_slice())?;
            Ok(())
        })
        .await
    }

    async fn remove_agent(
        &self,
        agent_id: &str,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<RemovedAgent, StoreError> {
        let agent_id = agent_id.to_owned();
        self.write("remove_agent", move |tx| {
            let record = {
                let agents = tx.open_table(AGENTS)?;
                agents
                    .get(agent_id.as_str())?
                    .map(|v| decode_agent(&agent_id, v.value()))
                    .transpose()?
            };
            let Some(record) = record else {
                return Err(StoreError::AgentNotFound(agent_id));
            };
            tx.open_table(AGENTS)?.remove(agent_id.as_str())?;
            tx.open_table(TOKENS)?.remove(&record.token_hash)?;
            let held: Vec<String> = {
                let leases = tx.open_table(LEASES)?;
                let mut held = Vec::new();
                for e in leases.iter()? {
                    let (job, holder) = e?;
                    if holder.value() == agent_id {
                        held.push(job.value().to_owned());
                    }
                }
                held
            };
            let mut out = RemovedAgent::default();
            for job in held {
                tx.open_table(LEASES)?.remove(job.as_str())?;
                if let Some(change) =
                    end_lease(tx, &job, &agent_id, "agent removed", max_attempts, now_ms)?
                {
                    out.changes.push(change);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|tx| {
            let agents = tx.open_table(AGENTS)?;
            let mut out = Vec::new();
            for e in agents.iter()? {
                let (k, v) = e?;
                out.push(decode_agent(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_enroll_grant(&self, grant: EnrollGrant) -> Result<(), StoreError> {
        self.write("put_enroll_grant", move |tx| {
            tx.open_table(GRANTS)?
                .insert(grant.id.as_str(), encode_grant(&grant).as_slice())?;
            Ok(())
        })
        .await
    }

    async fn list_enroll_grants(&self) -> Result<Vec<EnrollGrant>, StoreError> {
        self.read(|tx| {
            let grants = tx.open_table(GRANTS)?;
            let mut out = Vec::new();
            for e in grants.iter()? {
                let (k, v) = e?;
                out.push(decode_grant(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn remove_enroll_grant(&self, id: &str) -> Result<EnrollGrant, StoreError> {
        let id = id.to_owned();
        self.write("remove_enroll_grant", move |tx| {
            let mut grants = tx.open_table(GRANTS)?;
            let old = grants
                .remove(id.as_str())?
                .map(|v| decode_grant(&id, v.value()))
                .transpose()?;
            old.ok_or(StoreError::EnrollTokenNotFound(id))
        })
        .await
    }

    async fn use_enroll_grant(&self, id: &str, now_ms: i64) -> Result<EnrollGrant, StoreError> {
        let id = id.to_owned();
        self.write("use_enroll_grant", move |tx| {
            let mut grants = tx.open_table(GRANTS)?;
            let mut grant = match grants.get(id.as_str())? {
                Some(v) => decode_grant(&id, v.value())?,
                None => return Err(StoreError::EnrollTokenNotFound(id)),
            };
            if let Some(reason) = grant.spent(now_ms) {
                return Err(StoreError::EnrollTokenSpent { id, reason });
            }
            grant.uses += 1;
            grants.insert(id.as_str(), encode_grant(&grant).as_slice())?;
            Ok(grant)
        })
        .await
    }

    async fn create_job(&self, job: pb::JobDetail) -> Result<(), StoreError> {
        self.write("create_job", move |tx| {
            save_job(tx, &job)?;
            tx.open_table(QUEUED)?.insert(job.job_id.as_str(), ())?;
            Ok(())
        })
        .await
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<pb::JobDetail>, StoreError> {
        let job_id = job_id.to_owned();
        self.read(move |tx| {
            let jobs = tx.open_table(JOBS)?;
            jobs.get(job_id.as_str())?
                .map(|v| decode(&job_id, v.value()))
                .transpose()
        })
        .await
    }

    async fn list_jobs(
        &self,
        status: pb::JobStatus,
        limit: usize,
    ) -> Result<Vec<pb::JobDetail>, StoreError> {
        self.read(move |tx| {
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
        })
        .await
    }

    async fn queued_jobs(&self) -> Result<Vec<pb::JobDetail>, StoreError> {
        self.read(|tx| {
            let queued = tx.open_table(QUEUED)?;
            let jobs = tx.open_table(JOBS)?;
            let mut out = Vec::new();
            for e in queued.iter()? {
                let (k, _) = e?;
                if let Some(v) = jobs.get(k.value())? {
                    out.push(decode(k.value(), v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn leases(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.read(|tx| {
            let leases = tx.open_table(LEASES)?;
            let mut out = BTreeMap::new();
            for e in leases.iter()? {
                let (k, v) = e?;
                out.insert(k.value().to_owned(), v.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn claim_job(
        &self,
        job_id: &str,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<pb::JobDetail>, StoreError> {
        let (job_id, agent_id) = (job_id.to_owned(), agent_id.to_owned());
        self.write("claim_job", move |tx| {
            if tx.open_table(QUEUED)?.get(job_id.as_str())?.is_none() {
                return Ok(None);
            }
            let Some(mut job) = load_job(tx, &job_id)? else {
                return Ok(None);
            };
            tx.open_table(QUEUED)?.remove(job_id.as_str())?;
            if job.status() != pb::JobStatus::Queued {
                return Ok(None);
            }
            job.set_status(pb::JobStatus::Running);
            job.agent_id = agent_id.clone();
            job.attempts += 1;
            job.started_at = now_ms;
            save_job(tx, &job)?;
            tx.open_table(LEASES)?
                .insert(job_id.as_str(), agent_id.as_str())?;
            Ok(Some(job))
        })
        .await
    }

    async fn complete_job(
        &self,
        agent_id: &str,
        job_id: &str,
        outcome: JobOutcome,
    ) -> Result<pb::JobDetail, StoreError> {
        let (job_id, agent_id) = (job_id.to_owned(), agent_id.to_owned());
        self.write("complete_job", move |tx| {
            let holder = tx
                .open_table(LEASES)?
                .get(job_id.as_str())?
                .map(|v| v.value().to_owned());
            if holder.as_deref() != Some(agent_id.as_str()) {
                return Err(StoreError::NotLeased {
                    job: job_id,
                    agent: agent_id,
                });
            }
            let Some(mut job) = load_job(tx, &job_id)? else {
                return Err(StoreError::JobNotFound(job_id));
            };
            tx.open_table(LEASES)?.remove(job_id.as_str())?;
            let status = if job.cancel_requested {
                pb::JobStatus::Cancelled
            } else {
                outcome.status
            };
            job.exit_code = outcome.exit_code;
            job.output_tail = outcome.output_tail;
            job.error_message = if status == pb::JobStatus::Cancelled {
                format!("cancelled by an admin; {}", outcome.error_message)
            } else {
                outcome.error_message
            };
            job.plugin_results = outcome.plugin_results;
            if outcome.started_at > 0 {
                job.started_at = outcome.started_at;
            }
            job.finished_at = outcome.finished_at;
            finish_job(tx, &mut job, status, outcome.finished_at)?;
            Ok(job)
        })
        .await
    }

    async fn expire_leases(
        &self,
        expired: Vec<(String, String)>,
        max_attempts: u32,
        now_ms: i64,
    ) -> Result<Vec<LeaseChange>, StoreError> {
        self.write("expire_leases", move |tx| {
            let mut changes = Vec::new();
            for (job_id, agent_id) in &expired {
                let holder = tx
                    .open_table(LEASES)?
                    .get(job_id.as_str())?
                    .map(|v| v.value().to_owned());
                if holder.as_deref() != Some(agent_id.as_str()) {
                    continue;
                }
                tx.open_table(LEASES)?.remove(job_id.as_str())?;
                let why = "lease expired: the agent stopped heart-beating";
                if let Some(change) = end_lease(tx, job_id, agent_id, why, max_attempts, now_ms)? {
                    changes.push(change);
                }
            }
            Ok(changes)
        })
        .await
    }

    async fn cancel_job(&self, job_id: &str, now_ms: i64) -> Result<CancelOutcome, StoreError> {
        let job_id = job_id.to_owned();
        self.write("cancel_job", move |tx| {
            let Some(mut job) = load_job(tx, &job_id)? else {
                return Err(StoreError::JobNotFound(job_id));
            };
            match job.status() {
                pb::JobStatus::Queued => {
                    tx.open_table(QUEUED)?.remove(job_id.as_str())?;
                    job.error_message = "cancelled by an admin before any agent took it".into();
                    finish_job(tx, &mut job, pb::JobStatus::Cancelled, now_ms)?;
                    Ok(CancelOutcome::Cancelled(job))
                }
                pb::JobStatus::Running => {
                    if !job.cancel_requested {
                        job.cancel_requested = true;
                        save_job(tx, &job)?;
                    }
                    Ok(CancelOutcome::Requested(job))
                }
                _ => Ok(CancelOutcome::Finished(job)),
            }
        })
        .await
    }

    async fn fail_queued_needing(
        &self,
        key: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (key, reason) = (key.to_owned(), reason.to_owned());
        self.write("fail_queued_needing", move |tx| {
            let queued: Vec<String> = {
                let t = tx.open_table(QUEUED)?;
                let mut ids = Vec::new();
                for e in t.iter()? {
                    ids.push(e?.0.value().to_owned());
                }
                ids
            };
            let mut failed = Vec::new();
            for id in queued {
                let Some(mut job) = load_job(tx, &id)? else {
                    continue;
                };
                if job
                    .required_plugins
                    .iter()
                    .any(|r| plugin_key(&r.plugin_id, &r.version) == key)
                {
                    tx.open_table(QUEUED)?.remove(id.as_str())?;
                    job.error_message = reason.clone();
                    finish_job(tx, &mut job, pb::JobStatus::Failed, now_ms)?;
                    failed.push(id);
                }
            }
            Ok(failed)
        })
        .await
    }

    async fn delete_finished(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        // Most sweeps find nothing: look first, so that they cost no commit (and fsync).
        let any = self
            .read(move |tx| {
                let finished = tx.open_table(FINISHED)?;
                Ok(finished.range(..(before_ms, ""))?.next().is_some())
            })
            .await?;
        if !any {
            return Ok(0);
        }
        self.write("delete_finished", move |tx| {
            let doomed: Vec<(i64, String)> = {
                let finished = tx.open_table(FINISHED)?;
                let mut out = Vec::new();
                for e in finished.range(..(before_ms, ""))? {
                    let (k, _) = e?;
                    let (at, id) = k.value();
                    out.push((at, id.to_owned()));
                    if out.len() >= limit {
                        break;
                    }
                }
                out
            };
            let mut finished = tx.open_table(FINISHED)?;
            let mut jobs = tx.open_table(JOBS)?;
            for (at, id) in &doomed {
                finished.remove((*at, id.as_str()))?;
                jobs.remove(id.as_str())?;
            }
            Ok(doomed.len())
        })
        .await
    }
}

fn list_plugins(
    tx: &ReadTransaction,
    plugin_type: &str,
) -> Result<Vec<pb::PluginVersion>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (RedbStore, StoreMetrics) {
        let m = StoreMetrics::default();
        (
            RedbStore::open(&dir.join("c.redb"), 1 << 20, m.clone()).unwrap(),
            m,
        )
    }

    #[tokio::test]
    async fn enrolment_tokens_count_uses_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path());
        let grant = EnrollGrant {
            id: "g1".into(),
            token_hash: [7; 32],
            labels: [("team".to_owned(), "red".to_owned())].into(),
            id_pattern: "red-*".into(),
            expires_at: 1_000,
            max_uses: 2,
            uses: 0,
            note: String::new(),
            created_at: 0,
        };
        s.put_enroll_grant(grant.clone()).await.unwrap();
        assert_eq!(s.use_enroll_grant("g1", 10).await.unwrap().uses, 1);
        assert_eq!(s.use_enroll_grant("g1", 10).await.unwrap().uses, 2);
        assert!(matches!(
            s.use_enroll_grant("g1", 10).await,
            Err(StoreError::EnrollTokenSpent { .. })
        ));
        s.put_enroll_grant(EnrollGrant {
            id: "g2".into(),
            max_uses: 0,
            ..grant
        })
        .await
        .unwrap();
        s.use_enroll_grant("g2", 999).await.unwrap();
        assert!(matches!(
            s.use_enroll_grant("g2", 1_000).await,
            Err(StoreError::EnrollTokenSpent { .. })
        ));
        assert_eq!(s.list_enroll_grants().await.unwrap().len(), 2);
        assert_eq!(s.remove_enroll_grant("g1").await.unwrap().uses, 2);
        assert!(matches!(
            s.remove_enroll_grant("g1").await,
            Err(StoreError::EnrollTokenNotFound(_))
        ));
        assert!(matches!(
            s.use_enroll_grant("g1", 10).await,
            Err(StoreError::EnrollTokenNotFound(_))
        ));
    }

    #[tokio::test]
    async fn versions_of_lists_one_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path());
        for (id, version) in [
            ("a", "1.0.0"),
            ("a", "2.0.0-rc.1"),
            ("ab", "1.0.0"),
            ("a/b", "1.0.0"),
            ("a-b", "3.0.0"),
            ("0", "1.0.0"),
        ] {
            let bytes = format!("{id} {version}").into_bytes();
            let manifest = Arc::new(Manifest::from_reader(&bytes[..], 1024).unwrap());
            let plugin = pb::PluginVersion {
                plugin_id: id.into(),
                version: version.into(),
                sha256: manifest.content_id().to_hex(),
                ..Default::default()
            };
            s.put_plugin(plugin, manifest).await.unwrap();
        }
        let mut got: Vec<String> = s
            .versions_of("a")
            .await
            .unwrap()
            .into_iter()
            .map(|p| format!("{}@{}", p.plugin_id, p.version))
            .collect();
        got.sort();
        assert_eq!(got, ["a@1.0.0", "a@2.0.0-rc.1"]);
        assert!(s.versions_of("b").await.unwrap().is_empty());
    }

    #[test]
    fn id_patterns() {
        use super::super::glob_match;
        assert!(glob_match("red-*", "red-1"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("red-*", "blue-1"));
        assert!(!glob_match("a*b", "a"));
        assert!(!glob_match("a*bc", "abc-no"));
        assert!(!glob_match("x*", "é"));
    }

    fn job(id: &str) -> pb::JobDetail {
        pb::JobDetail {
            job_id: id.into(),
            status: pb::JobStatus::Queued as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn claims_skip_jobs_that_are_no_longer_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path());
        s.create_job(job("j1")).await.unwrap();
        let got = s.claim_job("j1", "a", 5).await.unwrap().unwrap();
        assert_eq!((got.attempts, got.agent_id.as_str()), (1, "a"));
        assert_eq!(got.status(), pb::JobStatus::Running);
        assert!(s.claim_job("j1", "b", 6).await.unwrap().is_none());
        assert!(s.claim_job("nope", "b", 6).await.unwrap().is_none());
        assert!(s.queued_jobs().await.unwrap().is_empty());
        let err = s
            .complete_job("b", "j1", JobOutcome::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotLeased { .. }), "{err}");
        let done = s
            .complete_job(
                "a",
                "j1",
                JobOutcome {
                    status: pb::JobStatus::Succeeded,
                    finished_at: 9,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(done.status(), pb::JobStatus::Succeeded);
        assert!(s.leases().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cancel_decides_queued_running_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path());
        s.create_job(job("q")).await.unwrap();
        s.create_job(job("r")).await.unwrap();
        assert!(matches!(
            s.cancel_job("q", 1).await.unwrap(),
            CancelOutcome::Cancelled(j) if j.status() == pb::JobStatus::Cancelled
        ));
        assert!(
            s.claim_job("q", "a", 2).await.unwrap().is_none(),
            "never leased"
        );
        s.claim_job("r", "a", 2).await.unwrap().unwrap();
        assert!(matches!(
            s.cancel_job("r", 3).await.unwrap(),
            CancelOutcome::Requested(j) if j.cancel_requested
        ));
        let ended = s
            .complete_job(
                "a",
                "r",
                JobOutcome {
                    status: pb::JobStatus::Failed,
                    finished_at: 4,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(ended.status(), pb::JobStatus::Cancelled);
        assert!(matches!(
            s.cancel_job("r", 5).await.unwrap(),
            CancelOutcome::Finished(_)
        ));
        assert!(matches!(
            s.cancel_job("x", 5).await.unwrap_err(),
            StoreError::JobNotFound(_)
        ));
        // Retention: both finished jobs go, in bounded batches.
        assert_eq!(
            s.delete_finished(4, 10).await.unwrap(),
            1,
            "only q finished before 4"
        );
        assert_eq!(s.delete_finished(100, 10).await.unwrap(), 1);
        assert!(s.get_job("r").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn expiry_requeues_then_fails_after_max_attempts_and_removal_requeues() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open(dir.path());
        s.create_job(job("j")).await.unwrap();
        s.claim_job("j", "a", 1).await.unwrap().unwrap();
        // A stale pair (another agent) is skipped.
        assert!(
            s.expire_leases(vec![("j".into(), "b".into())], 2, 2)
                .await
                .unwrap()
                .is_empty()
        );
        let c = s
            .expire_leases(vec![("j".into(), "a".into())], 2, 2)
            .await
            .unwrap();
        assert!(matches!(&c[..], [LeaseChange::Requeued(_)]), "{c:?}");
        s.claim_job("j", "a", 3).await.unwrap().unwrap();
        let c = s
            .expire_leases(vec![("j".into(), "a".into())], 2, 4)
            .await
            .unwrap();
        assert!(matches!(&c[..], [LeaseChange::Failed(_)]), "{c:?}");
        // Removing an agent re-queues what it holds and forgets its token.
        let agent = AgentRecord {
            agent_id: "a".into(),
            hostname: String::new(),
            labels: Default::default(),
            peer_id: String::new(),
            addrs: vec![],
            agent_version: String::new(),
            installed: vec![],
            registered_at: 0,
            token_hash: [7; 32],
            key_id: String::new(),
            proof_at: 0,
            granted: Default::default(),
        };
        s.put_agent(agent).await.unwrap();
        s.create_job(job("k")).await.unwrap();
        s.claim_job("k", "a", 5).await.unwrap().unwrap();
        let removed = s.remove_agent("a", 3, 6).await.unwrap();
        assert!(matches!(&removed.changes[..], [LeaseChange::Requeued(j)] if j.job_id == "k"));
        assert!(s.list_agents().await.unwrap().is_empty());
        assert_eq!(s.queued_jobs().await.unwrap().len(), 1);
        assert!(matches!(
            s.remove_agent("a", 3, 7).await.unwrap_err(),
            StoreError::AgentNotFound(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (s, m) = open(dir.path());
        let before = m.commit_count();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..400 {
            let s = s.clone();
            set.spawn(async move { s.create_job(job(&format!("j{i:03}"))).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        let commits = m.commit_count() - before;
        assert_eq!(m.write_count("create_job"), 400);
        assert!(commits < 400, "400 writes took {commits} commits");
        assert_eq!(s.queued_jobs().await.unwrap().len(), 400);
    }

    #[tokio::test]
    async fn a_schema_1_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut jobs = tx.open_table(JOBS).unwrap();
                let mut queue = tx.open_table(LEGACY_QUEUE).unwrap();
                jobs.insert("old-queued", job("old-queued").encode_to_vec().as_slice())
                    .unwrap();
                queue.insert(1, "old-queued").unwrap();
                let mut done = job("old-done");
                done.set_status(pb::JobStatus::Succeeded);
                done.finished_at = 10;
                jobs.insert("old-done", done.encode_to_vec().as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path, 1 << 20, StoreMetrics::default()).unwrap();
        let queued = s.queued_jobs().await.unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].job_id, "old-queued");
        assert_eq!(s.delete_finished(11, 10).await.unwrap(), 1);
        assert!(s.get_job("old-done").await.unwrap().is_none());
    }
}
