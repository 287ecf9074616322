//! A `FetchJob`'s hand-out: jobs reserved from the in-memory dispatch for one agent,
//! or a waiter the dispatch hands a job to, then leased in the store. The guards give a
//! job back to the queue, at its old place, whenever the call ends before its lease is
//! decided (the agent hung up, or was removed meanwhile).

use std::sync::Arc;

use arcade_p2p::labels;
use arcade_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::Status;

use super::{Shared, now_ms};
use crate::dispatch::{QueuedJob, WaiterId};
use crate::store::AgentRecord;

/// A job taken from the dispatch but not yet leased in the store: given back to the
/// queue, at its old place, unless [`Reserved::settled`] is called (also when the call
/// is dropped half-way because the agent hung up).
struct Reserved<'a> {
    shared: &'a Shared,
    job: Option<QueuedJob>,
}

impl Reserved<'_> {
    fn job_id(&self) -> &str {
        self.job.as_ref().map(|j| j.job_id.as_str()).unwrap_or("")
    }

    /// The store has decided (leased, or skipped: cancelled or taken elsewhere).
    fn settled(mut self) {
        self.job = None;
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let mut d = self.shared.dispatch.lock().expect("dispatch lock");
            d.restore(job);
            self.shared.sync_dispatch_gauges(&d);
        }
    }
}

/// A waiting `FetchJob`: on drop it leaves the waiters, and a job handed to it in the
/// meantime goes back to the queue (the hand-off and this happen under the dispatch
/// lock, so a job is never lost between them).
struct Waiting<'a> {
    shared: &'a Shared,
    id: WaiterId,
    rx: Option<oneshot::Receiver<QueuedJob>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut d = self.shared.dispatch.lock().expect("dispatch lock");
        d.stop_waiting(self.id);
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(job) = rx.try_recv() {
                d.restore(job);
            }
        }
        self.shared.sync_dispatch_gauges(&d);
    }
}

impl Shared {
    /// Takes up to `max` jobs for `agent` now, or waits (until `deadline`) to be handed
    /// one, then leases them in the store; empty when none came in time.
    pub(crate) async fn lease_for(
        &self,
        agent: &AgentRecord,
        labels: Arc<labels::Labels>,
        max: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<pb::JobDetail>, Status> {
        loop {
            let mut reserved: Vec<Reserved<'_>> = Vec::new();
            let waiting = {
                let mut d = self.dispatch.lock().expect("dispatch lock");
                while reserved.len() < max {
                    match d.take(&labels) {
                        Some(job) => reserved.push(Reserved {
                            shared: self,
                            job: Some(job),
                        }),
                        None => break,
                    }
                }
                let waiting = reserved.is_empty().then(|| {
                    let (tx, rx) = oneshot::channel();
                    Waiting {
                        shared: self,
                        id: d.wait(labels.clone(), tx),
                        rx: Some(rx),
                    }
                });
                self.sync_dispatch_gauges(&d);
                waiting
            };
            if let Some(mut waiting) = waiting {
                let rx = waiting.rx.as_mut().expect("receiver is set");
                tokio::select! {
                    handed = rx => {
                        waiting.rx = None;
                        match handed {
                            Ok(job) => reserved.push(Reserved { shared: self, job: Some(job) }),
                            Err(_) => return Ok(Vec::new()),
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                    _ = self.shutdown.cancelled() => return Ok(Vec::new()),
                }
            }
            if !self.is_current(agent) {
                // Removed or re-registered while waiting: the jobs go back (on drop).
                return Err(Status::unauthenticated(
                    "this agent was removed or registered again: Register again",
                ));
            }
            let mut leased = Vec::new();
            for r in reserved {
                let job = self
                    .store
                    .claim_job(r.job_id(), &agent.agent_id, now_ms())
                    .await?;
                r.settled();
                if let Some(job) = job {
                    self.start_lease(&agent.agent_id, &job.job_id);
                    tracing::info!(job = %job.job_id, agent = %agent.agent_id, attempt = job.attempts, "job leased");
                    leased.push(job);
                }
            }
            if !leased.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(leased);
            }
            // Every job we got had been cancelled meanwhile: wait on.
        }
    }
}
