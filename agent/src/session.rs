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
    /// What a job report may hold.
    pub limits: ReportLimits,
}

/// The limits of `ReportJobResult` the coordinator states at registration (defaults: the
/// limits of coordinators that did not state them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLimits {
    /// Most plugin results in one report.
    pub max_plugin_results: usize,
    /// Largest `result` of one plugin run, bytes.
    pub max_result_bytes: usize,
    /// Largest output tail the coordinator keeps, bytes.
    pub max_output_tail_bytes: usize,
}

impl Default for ReportLimits {
    fn default() -> Self {
        Self {
            max_plugin_results: 1024,
            max_result_bytes: 64 * 1024,
            max_output_tail_bytes: 64 * 1024,
        }
    }
}

impl ReportLimits {
    fn from_response(r: &pb::RegisterResponse) -> Self {
        let d = Self::default();
        let or = |v: u32, default: usize| if v == 0 { default } else { v as usize };
        Self {
            max_plugin_results: or(r.max_plugin_results, d.max_plugin_results),
            max_result_bytes: or(r.max_result_bytes, d.max_result_bytes),
            max_output_tail_bytes: or(r.max_output_tail_bytes, d.max_output_tail_bytes),
        }
    }

    /// Cuts `report` to fit: the output tail keeps its end, a plugin result over the limit
    /// is replaced by a note saying so (cut JSON would not parse), results beyond the
    /// count are dropped (the last one kept says how many). Returns whether it cut.
    pub fn fit(&self, report: &mut pb::ReportJobResultRequest) -> bool {
        let mut cut = false;
        if report.output_tail.len() > self.max_output_tail_bytes {
            let mut start = report.output_tail.len() - self.max_output_tail_bytes;
            while !report.output_tail.is_char_boundary(start) {
                start += 1;
            }
            report.output_tail = report.output_tail[start..].to_owned();
            cut = true;
        }
        for r in &mut report.plugin_results {
            if r.result.len() > self.max_result_bytes {
                r.result = format!(
                    "{{\"truncated\":true,\"bytes\":{},\"limit\":{}}}",
                    r.result.len(),
                    self.max_result_bytes
                );
                cut = true;
            }
        }
        if report.plugin_results.len() > self.max_plugin_results {
            let dropped = report.plugin_results.len() - self.max_plugin_results + 1;
            report
                .plugin_results
                .truncate(self.max_plugin_results.saturating_sub(1));
            report.plugin_results.push(pb::PluginExecutionResult {
                error_message: format!(
                    "{dropped} more plugin results were dropped: the coordinator keeps at most {}",
                    self.max_plugin_results
                ),
                ..Default::default()
            });
            cut = true;
        }
        cut
    }
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
    /// A session to `url` (connects on first use) with `tls` settings.
    pub fn new(
        url: &str,
        tls: &arcade_proto::ClientTls,
        agent_id: &str,
        enroll_token: &str,
    ) -> Result<Self, SessionError> {
        let channel = arcade_proto::client_endpoint_with(url, tls)
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
            limits: ReportLimits::from_response(&resp),
            mesh_ticket: resp.mesh_ticket,
            mesh_public_key: resp.mesh_public_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_cut_to_the_coordinators_limits() {
        let limits = ReportLimits {
            max_plugin_results: 3,
            max_result_bytes: 10,
            max_output_tail_bytes: 4,
        };
        let result = |r: &str| pb::PluginExecutionResult {
            result: r.into(),
            ..Default::default()
        };
        let mut report = pb::ReportJobResultRequest {
            output_tail: "abcdé12".into(),
            plugin_results: vec![
                result("{}"),
                result(&"x".repeat(11)),
                result("1"),
                result("2"),
            ],
            ..Default::default()
        };
        assert!(limits.fit(&mut report));
        assert_eq!(
            report.output_tail, "é12",
            "the last 4 bytes, on a char boundary"
        );
        assert_eq!(report.plugin_results.len(), 3);
        assert_eq!(report.plugin_results[0].result, "{}");
        assert!(
            report.plugin_results[1]
                .result
                .contains("\"truncated\":true")
        );
        assert!(
            report.plugin_results[2]
                .error_message
                .contains("2 more plugin results")
        );
        let mut small = pb::ReportJobResultRequest::default();
        assert!(!limits.fit(&mut small));
        let older = ReportLimits::from_response(&pb::RegisterResponse::default());
        assert_eq!(older, ReportLimits::default());
    }
}
