//! The connection to the coordinator: one channel, the admin token on every call and
//! the message size limits.

use std::time::Duration;

use arcade_proto::auth::{Authed, Bearer};
use arcade_proto::v1::fleet_client::FleetClient;
use arcade_proto::v1::jobs_client::JobsClient;
use arcade_proto::v1::plugin_admin_client::PluginAdminClient;
use tonic::transport::Channel;

use super::error::{CtlError, error_chain};

/// Largest message the client decodes (manifests of many chunks can be large).
pub const MAX_DECODE: usize = arcade_proto::MAX_MESSAGE;

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks the admin token given on the command line.
fn bearer(token: Option<&str>) -> Result<Bearer, CtlError> {
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
        CtlError::Usage("no admin token: pass --token or set ARCADE_TOKEN".into())
    })?;
    Bearer::new(token).map_err(|e| CtlError::Usage(format!("--token: {e}")))
}

/// An open connection to the coordinator.
pub struct Connection {
    url: String,
    channel: Channel,
    auth: Bearer,
}

/// Adds `http://` when the URL has no scheme.
fn normalise_url(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

impl Connection {
    /// Checks the token and connects (eagerly, so an unreachable coordinator is
    /// reported as such).
    pub async fn connect(
        url: &str,
        tls: &arcade_proto::ClientTls,
        token: Option<&str>,
    ) -> Result<Self, CtlError> {
        let auth = bearer(token)?;
        let url = normalise_url(url);
        let endpoint = arcade_proto::client_endpoint_with(&url, tls)
            .map_err(|e| CtlError::BadUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(CtlError::Unreachable {
                    url,
                    reason: error_chain(&e),
                });
            }
            Err(_) => {
                return Err(CtlError::Unreachable {
                    url,
                    reason: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        };
        Ok(Self { url, channel, auth })
    }

    /// The `PluginAdmin` client.
    pub fn plugins(&self) -> PluginAdminClient<Authed> {
        PluginAdminClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_DECODE)
    }

    /// The `Jobs` client.
    pub fn jobs(&self) -> JobsClient<Authed> {
        JobsClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_DECODE)
    }

    /// The `Fleet` client.
    pub fn fleet(&self) -> FleetClient<Authed> {
        FleetClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_DECODE)
    }

    /// Turns a failed call into an error; a status caused by the transport (the
    /// connection dropped) is reported as an unreachable coordinator.
    pub fn error(&self, status: tonic::Status) -> CtlError {
        use std::error::Error as _;
        match status.source() {
            Some(source) if status.code() == tonic::Code::Unavailable => CtlError::Unreachable {
                url: self.url.clone(),
                reason: error_chain(source),
            },
            _ => CtlError::from(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_without_scheme_get_http() {
        assert_eq!(normalise_url("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalise_url("https://x:1"), "https://x:1");
    }

    #[test]
    fn tokens_are_checked() {
        assert!(bearer(None).is_err());
        assert!(bearer(Some("")).is_err());
        assert!(bearer(Some("a b")).is_err());
        assert!(bearer(Some("admin-token-1")).is_ok());
    }
}
