//! Running jobs in memory: who holds each lease, until when, and whether an admin asked
//! for its cancel; the lease sweep (expired leases are re-queued, failed or cancelled in
//! the store, then re-dispatched) and the retention sweep of finished jobs.
//!
//! Deadlines live only here (a heartbeat writes nothing); the store knows who holds
//! each lease, so after a restart every lease gets one fresh `jobs.lease_ttl`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::store::{LeaseChange, StoreError};

use super::{Shared, now_ms};

/// One running job.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) agent: String,
    pub(crate) deadline: Instant,
    /// An admin cancelled it: the agent is told to stop it.
    pub(crate) cancel: bool,
    /// Where the job is, as its agent last reported (`GetJob` shows it).
    pub(crate) progress: Option<arcade_proto::v1::JobProgress>,
}

/// Leases by job, with each agent's jobs.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    by_job: HashMap<String, Lease>,
    by_agent: HashMap<String, HashSet<String>>,
}

impl Leases {
    pub(crate) fn start(&mut self, job: String, agent: String, deadline: Instant) {
        self.end(&job);
        self.by_agent
            .entry(agent.clone())
            .or_default()
            .insert(job.clone());
        self.by_job.insert(
            job,
            Lease {
                agent,
                deadline,
                cancel: false,
                progress: None,
            },
        );
    }

    pub(crate) fn end(&mut self, job: &str) -> Option<Lease> {
        let lease = self.by_job.remove(job)?;
        if let Some(set) = self.by_agent.get_mut(&lease.agent) {
            set.remove(job);
            if set.is_empty() {
                self.by_agent.remove(&lease.agent);
            }
        }
        Some(lease)
    }

    /// Jobs running now.
    pub(crate) fn running(&self) -> usize {
        self.by_job.len()
    }

    pub(crate) fn get(&self, job: &str) -> Option<&Lease> {
        self.by_job.get(job)
    }

    /// Marks a running job's cancel; false when it is not leased.
    pub(crate) fn request_cancel(&mut self, job: &str) -> bool {
        match self.by_job.get_mut(job) {
            Some(l) => {
                l.cancel = true;
                true
            }
            None => false,
        }
    }

    /// The jobs leased to `agent`.
    pub(crate) fn of_agent(&self, agent: &str) -> Vec<String> {
        let mut jobs: Vec<String> = self
            .by_agent
            .get(agent)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        jobs.sort();
        jobs
    }
}

/// What a heartbeat tells an agent about the jobs it claims to run.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Extended {
    /// Claimed jobs it does not hold: stop them.
    pub(crate) revoked: Vec<String>,
    /// Claimed jobs an admin cancelled: kill them and report.
    pub(crate) cancelled: Vec<String>,
}

impl Shared {
    /// Starts the lease deadline of a freshly leased job.
    pub(crate) fn start_lease(&self, agent_id: &str, job_id: &str) {
        let deadline = Instant::now() + self.config.raw.jobs.lease_ttl.get();
        self.leases.lock().expect("lease lock").start(
            job_id.to_owned(),
            agent_id.to_owned(),
            deadline,
        );
    }

    /// Extends the leases of the `claimed` jobs that `agent_id` holds and records their
    /// `progress`. Leases the agent holds but no longer claims (it restarted and lost
    /// them) are left to expire.
    pub(crate) fn extend_leases(
        &self,
        agent_id: &str,
        claimed: &[String],
        progress: &[arcade_proto::v1::JobProgress],
    ) -> Extended {
        let deadline = Instant::now() + self.config.raw.jobs.lease_ttl.get();
        let mut leases = self.leases.lock().expect("lease lock");
        for p in progress {
            if let Some(l) = leases.by_job.get_mut(&p.job_id) {
                if l.agent == agent_id && p.phase.len() <= 32 && p.current.len() <= 1024 {
                    l.progress = Some(p.clone());
                }
            }
        }
        let mut out = Extended::default();
        for job in claimed {
            match leases.by_job.get_mut(job) {
                Some(l) if l.agent == agent_id => {
                    l.deadline = deadline;
                    if l.cancel {
                        out.cancelled.push(job.clone());
                    }
                }
                _ => out.revoked.push(job.clone()),
            }
        }
        out
    }

    /// Applies lease endings the store made (expiry, agent removal): re-queued jobs are
    /// dispatched again, the rest counted.
    pub(crate) async fn apply_lease_changes(&self, changes: Vec<LeaseChange>, why: &str) {
        for change in changes {
            let (outcome, job_id) = match change {
                LeaseChange::Requeued(job) => {
                    let id = job.job_id.clone();
                    match self.need_of(&job).await {
                        Ok(need) => self.enqueue(id.clone(), need),
                        Err(e) => {
                            tracing::error!(job = %id, error = %e.message(), "re-queued job cannot be dispatched")
                        }
                    }
                    ("requeued", id)
                }
                LeaseChange::Failed(j) => {
                    self.count_finished("failed");
                    ("failed", j)
                }
                LeaseChange::Cancelled(j) => {
                    self.count_finished("cancelled");
                    ("cancelled", j)
                }
            };
            tracing::warn!(job = %job_id, outcome, "{why}");
            self.metrics
                .leases_expired
                .get_or_create(&crate::metrics::OutcomeLabel {
                    outcome: outcome.into(),
                })
                .inc();
        }
    }

    pub(crate) fn count_finished(&self, status: &str) {
        self.metrics
            .jobs_finished
            .get_or_create(&crate::metrics::StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    /// Ends expired leases (re-queue, fail or cancel); called periodically.
    pub(crate) async fn sweep_leases(&self) -> Result<(), StoreError> {
        let now = Instant::now();
        let expired: Vec<(String, String)> = {
            let leases = self.leases.lock().expect("lease lock");
            leases
                .by_job
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(j, l)| (j.clone(), l.agent.clone()))
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let max = self.config.raw.jobs.max_attempts;
        let changes = self
            .store
            .expire_leases(expired.clone(), max, now_ms())
            .await?;
        {
            let mut leases = self.leases.lock().expect("lease lock");
            for (job, agent) in &expired {
                if leases
                    .get(job)
                    .is_some_and(|l| &l.agent == agent && l.deadline <= now)
                {
                    leases.end(job);
                }
            }
        }
        self.apply_lease_changes(changes, "job lease expired without a heartbeat")
            .await;
        Ok(())
    }

    /// Deletes finished jobs older than `jobs.retention`, in bounded batches; returns
    /// how many.
    pub(crate) async fn sweep_retention(&self) -> Result<usize, StoreError> {
        let retention = self.config.raw.jobs.retention.get();
        if retention.is_zero() {
            return Ok(0);
        }
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let n = self.store.delete_finished(cutoff, RETENTION_BATCH).await?;
            total += n;
            if n < RETENTION_BATCH || self.shutdown.is_cancelled() {
                break;
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "retention: finished jobs deleted");
        }
        Ok(total)
    }
}

/// Finished jobs deleted per write.
const RETENTION_BATCH: usize = 1000;

/// How often the retention sweep runs: a tenth of the retention, within [1 s, 1 min].
pub(crate) fn retention_period(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
