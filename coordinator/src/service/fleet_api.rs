//! `Fleet`: the admin view of the agents (list, status: `fleet_status.rs`), their
//! removal, and the enrolment tokens that grant labels (`identity.rs` holds what they
//! mean).

use arcade_p2p::labels;
use arcade_proto::v1 as pb;
use arcade_proto::v1::fleet_server::Fleet;
use tonic::{Request, Response, Status};

use super::agents::{MAX_AGENT_ID, installed_to_proto};
use super::{SharedRef, now_ms, shown, token_hash};
use crate::store::{EnrollGrant, LeaseChange};

/// Most enrolment tokens at once.
const MAX_ENROLL_TOKENS: usize = 10_000;

fn grant_info(g: &EnrollGrant) -> pb::EnrollTokenInfo {
    pb::EnrollTokenInfo {
        id: g.id.clone(),
        labels: labels::to_proto(&g.labels),
        id_pattern: g.id_pattern.clone(),
        expires_at: g.expires_at,
        max_uses: g.max_uses,
        uses: g.uses,
        note: g.note.clone(),
        created_at: g.created_at,
    }
}

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
        // Its token stops working now; it is no longer hinted or counted; its mesh
        // ticket is revoked fleet-wide (peers learn it from their heartbeat answers).
        let live = s.fleet.lock().expect("fleet lock").remove(&id);
        s.preheats.lock().expect("preheat lock").forget_agent(&id);
        if let Some(live) = live.filter(|l| !l.record.peer_id.is_empty()) {
            // A ticket issued before this start is not known: assume a full lifetime.
            let ttl = s.config.raw.mesh.ticket_ttl.get().as_millis() as i64;
            let expires = if live.ticket_expires_at > 0 {
                live.ticket_expires_at
            } else {
                now_ms() + ttl
            };
            s.identity.revoke(&live.record.peer_id, expires);
        }
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

    async fn create_enroll_token(
        &self,
        request: Request<pb::CreateEnrollTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollTokenResponse>, Status> {
        use rand::RngCore as _;
        let s = &self.0;
        s.require_admin(&request)?;
        let req = request.into_inner();
        let granted = labels::from_proto(&req.labels)
            .map_err(|e| Status::invalid_argument(format!("labels: {e}")))?;
        if req.id_pattern.len() > MAX_AGENT_ID
            || !req
                .id_pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b))
        {
            return Err(Status::invalid_argument(format!(
                "id_pattern {:?} is invalid: at most {MAX_AGENT_ID} characters of [A-Za-z0-9._-] and `*`",
                shown(&req.id_pattern)
            )));
        }
        if req.note.len() > 256 {
            return Err(Status::invalid_argument("note is longer than 256 bytes"));
        }
        if req.expires_in_seconds > 10 * 365 * 86_400 {
            return Err(Status::invalid_argument(
                "expires_in_seconds is over 10 years (0 = never)",
            ));
        }
        if s.identity.grants().len() >= MAX_ENROLL_TOKENS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_ENROLL_TOKENS} enrolment tokens exist: revoke unused ones (`arcadectl enroll revoke ID`)"
            )));
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("arcade-enroll-{}", hex::encode(secret));
        let mut id = [0u8; 6];
        rand::rng().fill_bytes(&mut id);
        let now = now_ms();
        let grant = EnrollGrant {
            id: hex::encode(id),
            token_hash: token_hash(&token),
            labels: granted,
            id_pattern: req.id_pattern,
            expires_at: if req.expires_in_seconds == 0 {
                0
            } else {
                now + (req.expires_in_seconds as i64) * 1000
            },
            max_uses: req.max_uses,
            uses: 0,
            note: req.note,
            created_at: now,
        };
        s.store.put_enroll_grant(grant.clone()).await?;
        s.identity.put_grant(grant.clone());
        tracing::info!(token = %grant.id, labels = ?grant.labels, "enrolment token created");
        Ok(Response::new(pb::CreateEnrollTokenResponse {
            token,
            info: Some(grant_info(&grant)),
        }))
    }

    async fn list_enroll_tokens(
        &self,
        request: Request<pb::ListEnrollTokensRequest>,
    ) -> Result<Response<pb::ListEnrollTokensResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        Ok(Response::new(pb::ListEnrollTokensResponse {
            tokens: s.identity.grants().iter().map(grant_info).collect(),
        }))
    }

    async fn revoke_enroll_token(
        &self,
        request: Request<pb::RevokeEnrollTokenRequest>,
    ) -> Result<Response<pb::RevokeEnrollTokenResponse>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        let id = request.into_inner().id;
        if id.is_empty() || id.len() > 64 {
            return Err(Status::invalid_argument(
                "give the token id (`arcadectl enroll list`)",
            ));
        }
        let removed = s.store.remove_enroll_grant(&id).await?;
        s.identity.remove_grant(&removed.token_hash);
        tracing::info!(token = %id, "enrolment token revoked");
        Ok(Response::new(pb::RevokeEnrollTokenResponse {}))
    }

    async fn get_fleet_status(
        &self,
        request: Request<pb::GetFleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatus>, Status> {
        let s = &self.0;
        s.require_admin(&request)?;
        Ok(Response::new(super::fleet_status::fleet_status(s).await?))
    }
}
