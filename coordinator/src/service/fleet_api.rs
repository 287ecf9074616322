//! `Fleet`: the admin view of the agents (list) and their removal.

use arcade_p2p::labels;
use arcade_proto::v1 as pb;
use arcade_proto::v1::fleet_server::Fleet;
use tonic::{Request, Response, Status};

use super::agents::{MAX_AGENT_ID, installed_to_proto};
use super::{SharedRef, now_ms, shown};
use crate::store::LeaseChange;

/// The `Fleet` service.
pub(crate) struct FleetService(pub(crate) SharedRef);

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let now = now_ms();
        let fleet = s.fleet.lock().expect("fleet lock").agents.clone();
        let mut agents: Vec<pb::AgentSummary> = {
            let leases = s.leases.lock().expect("lease lock");
            fleet
                .values()
                .map(|a| {
                    let r = &a.record;
                    pb::AgentSummary {
                        agent_id: r.agent_id.clone(),
                        hostname: r.hostname.clone(),
                        labels: labels::to_proto(&r.labels),
                        peer_id: r.peer_id.clone(),
                        addrs: r.addrs.clone(),
                        agent_version: r.agent_version.clone(),
                        installed_plugins: installed_to_proto(&r.installed),
                        registered_at: r.registered_at,
                        last_seen: a.last_seen,
                        online: s.online(a, now),
                        running_jobs: leases.of_agent(&r.agent_id),
                    }
                })
                .collect()
        };
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn remove_agent(
        &self,
        request: Request<pb::RemoveAgentRequest>,
    ) -> Result<Response<pb::RemoveAgentResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let id = request.into_inner().agent_id;
        if id.is_empty() || id.len() > MAX_AGENT_ID {
            return Err(Status::invalid_argument(format!(
                "agent_id {:?} is invalid: 1-{MAX_AGENT_ID} characters",
                shown(&id)
            )));
        }
        let removed = s
            .store
            .remove_agent(&id, s.config.raw.jobs.max_attempts, now_ms())
            .await?;
        // Its token stops working now; it is no longer hinted or counted.
        s.fleet.lock().expect("fleet lock").remove(&id);
        {
            let mut leases = s.leases.lock().expect("lease lock");
            for job in leases.of_agent(&id) {
                leases.end(&job);
            }
        }
        let requeued: Vec<String> = removed
            .changes
            .iter()
            .filter_map(|c| match c {
                LeaseChange::Requeued(job) => Some(job.job_id.clone()),
                _ => None,
            })
            .collect();
        s.apply_lease_changes(removed.changes, "agent removed: its lease ended")
            .await;
        tracing::info!(agent = %id, requeued = requeued.len(), "agent removed");
        Ok(Response::new(pb::RemoveAgentResponse {
            requeued_jobs: requeued,
        }))
    }
}
