//! Authenticated gRPC clients of a coordinator and streaming helpers: push from memory,
//! register agents, download chunk ranges, read `/metrics`.

use arcade_coordinator::RunningCoordinator;
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::MAX_MESSAGE;
pub use arcade_proto::auth::{Authed, Bearer};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use arcade_proto::v1::fleet_client::FleetClient;
use arcade_proto::v1::jobs_client::JobsClient;
use arcade_proto::v1::plugin_admin_client::PluginAdminClient;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The key of a simulated agent: derived from its id, so registering the same id again
/// proves the same identity (as a real agent's key file does).
pub fn agent_key(agent_id: &str) -> libp2p_identity::Keypair {
    let seed: [u8; 32] = Sha256::digest(format!("arcade-sim-agent/{agent_id}")).into();
    // A 32-byte seed is always a valid ed25519 secret key.
    libp2p_identity::Keypair::ed25519_from_bytes(seed).expect("ed25519 seed")
}

/// The peer id of [`agent_key`]`(agent_id)`.
pub fn agent_peer_id(agent_id: &str) -> String {
    agent_key(agent_id).public().to_peer_id().to_string()
}

/// `req` signed with [`agent_key`] of its agent id, now.
pub fn signed(mut req: pb::RegisterRequest) -> pb::RegisterRequest {
    let key = agent_key(&req.agent_id);
    arcade_p2p::identity::sign_register(&mut req, &key, arcade_p2p::now_ms());
    req
}

/// How to reach a coordinator: its gRPC URL and metrics address.
#[derive(Debug, Clone)]
pub struct Conn {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Metrics listener, if any.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Admin token.
    pub admin_token: String,
    /// Enrollment token.
    pub enroll_token: String,
    /// Plaintext gRPC to an address that is not loopback is allowed: only for a
    /// coordinator in a network namespace of this process's own ([`crate::netns`]).
    pub insecure: bool,
}

impl Conn {
    /// The connection of an in-process coordinator.
    pub fn of(running: &RunningCoordinator) -> Self {
        Self {
            url: running.url(),
            metrics_addr: running.metrics_addr,
            admin_token: running.admin_token.clone(),
            enroll_token: running.enroll_token.clone(),
            insecure: false,
        }
    }

    /// A channel to the gRPC port; it connects on first use, so an unreachable
    /// coordinator shows up as an `UNAVAILABLE` status of the call.
    pub async fn channel(&self) -> Channel {
        // The URL comes from a started coordinator (`http://ADDR`), so it parses, and
        // plaintext to a non-loopback ADDR is refused unless `insecure` says otherwise.
        let tls = arcade_proto::ClientTls {
            insecure: self.insecure,
            ..Default::default()
        };
        arcade_proto::client_endpoint_with(&self.url, &tls)
            .expect("coordinator URL is http://ADDR")
            .connect_lazy()
    }

    async fn authed(&self, token: &str) -> Authed {
        // Tokens here are coordinator-issued hex or configured ASCII test tokens.
        let bearer = Bearer::new(token).expect("token is printable ASCII");
        InterceptedService::new(self.channel().await, bearer)
    }

    /// PluginAdmin client with `token`.
    pub async fn plugins(&self, token: &str) -> PluginAdminClient<Authed> {
        PluginAdminClient::new(self.authed(token).await).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Jobs client with `token`.
    pub async fn jobs(&self, token: &str) -> JobsClient<Authed> {
        JobsClient::new(self.authed(token).await)
    }

    /// Fleet client with `token`.
    pub async fn fleet(&self, token: &str) -> FleetClient<Authed> {
        FleetClient::new(self.authed(token).await)
    }

    /// Agent client with `token`.
    pub async fn agent(&self, token: &str) -> AgentClient<Authed> {
        AgentClient::new(self.authed(token).await).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Registers an agent and returns its token.
    pub async fn register(
        &self,
        agent_id: &str,
        labels: &[(&str, &str)],
        installed: Vec<pb::InstalledPlugin>,
    ) -> String {
        self.register_with(agent_id, labels, installed, false)
            .await
            .expect("register")
    }

    /// A new enrolment token (made with the admin token) that grants `labels`.
    pub async fn grant(&self, labels: &[(&str, &str)]) -> Result<String, Status> {
        let resp = self
            .fleet(&self.admin_token)
            .await
            .create_enroll_token(pb::CreateEnrollTokenRequest {
                labels: labels
                    .iter()
                    .map(|(k, v)| pb::Label {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .await?;
        Ok(resp.into_inner().token)
    }

    /// Registers an agent, signed with [`agent_key`] (with a token granting its labels); with `mesh`, as a mesh peer (its
    /// peer id is [`agent_peer_id`], with one advertised address).
    pub async fn register_with(
        &self,
        agent_id: &str,
        labels: &[(&str, &str)],
        installed: Vec<pb::InstalledPlugin>,
        mesh: bool,
    ) -> Result<String, Status> {
        // Restricted labels need a token that grants them: the admin makes one.
        let token = if labels.is_empty() {
            self.enroll_token.clone()
        } else {
            self.grant(labels).await?
        };
        let mut c = self.agent(&token).await;
        let peer_id = if mesh {
            agent_peer_id(agent_id)
        } else {
            String::new()
        };
        let resp = c
            .register(signed(pb::RegisterRequest {
                agent_id: agent_id.into(),
                hostname: "test-host".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| pb::Label {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                addrs: if mesh {
                    vec!["/ip4/127.0.0.1/tcp/4001".into()]
                } else {
                    vec![]
                },
                peer_id,
                installed_plugins: installed,
                ..Default::default()
            }))
            .await?;
        Ok(resp.into_inner().agent_token)
    }

    /// Pushes `data` as `id@version` in 256 KiB messages.
    pub async fn push(
        &self,
        id: &str,
        version: &str,
        data: &[u8],
        header: pb::PushPluginHeader,
    ) -> Result<pb::PushPluginResponse, Status> {
        let pieces: Vec<Vec<u8>> = data.chunks(256 * 1024).map(<[u8]>::to_vec).collect();
        self.push_stream(id, version, header, pieces).await
    }

    /// Pushes the blocks `data` yields as `id@version`; blocks are pulled only as fast
    /// as the coordinator takes them, so memory stays bounded.
    pub async fn push_stream<I>(
        &self,
        id: &str,
        version: &str,
        header: pb::PushPluginHeader,
        data: I,
    ) -> Result<pb::PushPluginResponse, Status>
    where
        I: IntoIterator<Item = Vec<u8>>,
        I::IntoIter: Send + 'static,
    {
        let mut client = self.plugins(&self.admin_token).await;
        let header = pb::PushPluginRequest {
            msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
                plugin_id: id.into(),
                version: version.into(),
                ..header
            })),
        };
        let body = data.into_iter().map(|piece| pb::PushPluginRequest {
            msg: Some(pb::push_plugin_request::Msg::Data(piece)),
        });
        let msgs = std::iter::once(header).chain(body);
        client
            .push_plugin(futures::stream::iter(msgs))
            .await
            .map(|r| r.into_inner())
    }

    /// Pushes [`crate::sample::executable_blocks`]`(size, seed)` as `id@version` with its
    /// SHA-256 (computed in a first streaming pass), never holding it in memory.
    /// `header` gives the other fields (e.g. `cdc`).
    pub async fn push_generated(
        &self,
        id: &str,
        version: &str,
        size: u64,
        seed: u64,
        header: pb::PushPluginHeader,
    ) -> Result<pb::PushPluginResponse, Status> {
        let mut sha = Sha256::new();
        for block in crate::sample::executable_blocks(size, seed) {
            sha.update(&block);
        }
        let header = pb::PushPluginHeader {
            expected_sha256: ContentId::from_bytes(sha.finalize().into()).to_hex(),
            ..header
        };
        self.push_stream(
            id,
            version,
            header,
            crate::sample::executable_blocks(size, seed),
        )
        .await
    }

    /// Downloads chunk ranges (empty = all) and returns (messages, concatenated bytes).
    pub async fn download(
        &self,
        token: &str,
        req: pb::DownloadPluginRequest,
    ) -> Result<(Vec<pb::DownloadPluginResponse>, Vec<u8>), Status> {
        let mut msgs = Vec::new();
        let mut bytes = Vec::new();
        self.download_each(token, req, |msg| {
            bytes.extend_from_slice(&msg.data);
            msgs.push(msg);
        })
        .await?;
        Ok((msgs, bytes))
    }

    /// Downloads chunk ranges (empty = all), handing each message to `each` as it
    /// arrives (nothing is accumulated).
    pub async fn download_each(
        &self,
        token: &str,
        req: pb::DownloadPluginRequest,
        mut each: impl FnMut(pb::DownloadPluginResponse),
    ) -> Result<(), Status> {
        let mut client = self.agent(token).await;
        let mut stream = client.download_plugin(req).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            each(msg);
        }
        Ok(())
    }

    /// Fetches a plugin as `token`, checking every chunk's BLAKE3 against the
    /// manifest as it arrives and the whole SHA-256 at the end, without keeping the
    /// bytes; returns the bytes received.
    pub async fn fetch_verified(
        &self,
        token: &str,
        plugin: &str,
        version: &str,
    ) -> anyhow::Result<u64> {
        let mut client = self.agent(token).await;
        let resp = client
            .get_manifest(pb::GetManifestRequest {
                plugin_id: plugin.into(),
                version: version.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let manifest = Manifest::from_proto(
            resp.manifest
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("coordinator sent no manifest"))?,
        )?;
        let mut sha = Sha256::new();
        let mut bytes = 0u64;
        let mut bad = None;
        self.download_each(
            token,
            pb::DownloadPluginRequest {
                plugin_id: plugin.into(),
                version: version.into(),
                ..Default::default()
            },
            |msg| {
                if bad.is_none() {
                    if let Err(e) = manifest.verify_chunk(msg.chunk_index, &msg.data) {
                        bad = Some(e);
                    }
                }
                sha.update(&msg.data);
                bytes += msg.data.len() as u64;
            },
        )
        .await?;
        if let Some(e) = bad {
            anyhow::bail!("chunk check failed: {e}");
        }
        let got = ContentId::from_bytes(sha.finalize().into());
        anyhow::ensure!(got == manifest.content_id(), "SHA-256 mismatch: got {got}");
        Ok(bytes)
    }

    /// The text of `GET /metrics` (status line and headers included).
    pub async fn metrics_text(&self) -> String {
        scrape(self.metrics_addr.expect("metrics enabled")).await
    }
}

/// The whole answer to `GET /metrics` at `addr` (coordinator or agent), status line
/// and headers included.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}
