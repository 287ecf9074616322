//! The agent's session with the coordinator: one lazily connected channel, the
//! per-agent token shared by every client (replaced on re-registration), and
//! registration itself.

use arcade_proto::auth::{Authed, Bearer};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cache::CachedPlugin;

/// What the coordinator told us at registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Heartbeat interval it expects.
    pub heartbeat_interval: std::time::Duration,
    /// The mesh ticket for our peer id (empty without one).
    pub mesh_ticket: Vec<u8>,
    /// The coordinator's ticket-signing public key.
    pub mesh_public_key: Vec<u8>,
}

/// A connection to the coordinator on behalf of one agent.
#[derive(Clone, Debug)]
pub struct Session {
    channel: Channel,
    token: Bearer,
    enroll: Bearer,
    /// This agent's id.
    pub agent_id: String,
}

/// A session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator URL is unusable.
    #[error("coordinator URL {url:?} is invalid: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The enrollment token cannot be sent.
    #[error("enroll_token: {0}")]
    BadToken(#[from] arcade_proto::auth::InvalidToken),
}

/// The installed-plugin list reported to the coordinator.
pub fn installed_list(plugins: &[CachedPlugin]) -> Vec<pb::InstalledPlugin> {
    plugins
        .iter()
        .map(|p| pb::InstalledPlugin {
            plugin_id: p.plugin.id.to_string(),
            version: p.plugin.version.to_string(),
            sha256: p.sha256.to_hex(),
        })
        .collect()
}

impl Session {
    /// A session to `url` (connects on first use).
    pub fn new(url: &str, agent_id: &str, enroll_token: &str) -> Result<Self, SessionError> {
        let channel = arcade_proto::client_endpoint(url)
            .map_err(|e| SessionError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_lazy();
        let enroll = Bearer::new(if enroll_token.is_empty() {
            "-"
        } else {
            enroll_token
        })?;
        Ok(Self {
            channel,
            // Replaced by the token Register returns; until then calls are refused.
            token: Bearer::new("unregistered")?,
            enroll,
            agent_id: agent_id.to_owned(),
        })
    }

    /// An `Agent` client carrying this agent's token.
    pub fn client(&self) -> AgentClient<Authed> {
        AgentClient::new(InterceptedService::new(
            self.channel.clone(),
            self.token.clone(),
        ))
        .max_decoding_message_size(arcade_proto::MAX_MESSAGE)
    }

    /// Registers (or re-registers) and installs the returned token.
    pub async fn register(&self, request: pb::RegisterRequest) -> Result<Registration, Status> {
        let mut client = AgentClient::new(InterceptedService::new(
            self.channel.clone(),
            self.enroll.clone(),
        ));
        let resp = client.register(request).await?.into_inner();
        self.token.replace(&resp.agent_token).map_err(|e| {
            Status::internal(format!("coordinator returned an unusable token: {e}"))
        })?;
        Ok(Registration {
            heartbeat_interval: std::time::Duration::from_secs(u64::from(
                resp.heartbeat_interval_seconds.max(1),
            )),
            mesh_ticket: resp.mesh_ticket,
            mesh_public_key: resp.mesh_public_key,
        })
    }
}
