//! Harness for the end-to-end tests: real coordinators started in-process on
//! 127.0.0.1:0 with their own temp data directory, and authenticated gRPC clients over
//! real TCP.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use arcade_proto::v1::fleet_client::FleetClient;
use arcade_proto::v1::jobs_client::JobsClient;
use arcade_proto::v1::plugin_admin_client::PluginAdminClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Admin token of test coordinators.
pub const ADMIN: &str = "test-admin-token";
/// Enrollment token of test coordinators.
pub const ENROLL: &str = "test-enroll-token";

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(arcade_proto::AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}

/// A channel with a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A test coordinator and its data directory.
pub struct TestCoordinator {
    /// The running coordinator (None once stopped).
    pub running: Option<RunningCoordinator>,
    /// The config it was started with.
    pub config: CoordinatorConfig,
    /// Its temp dir (data_dir is `dir/data`).
    pub dir: tempfile::TempDir,
}

/// A config for tests: loopback port 0, fixed tokens, small chunks, unsafe content
/// allowed (tests push arbitrary bytes), data under `dir`.
pub fn test_config(dir: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        data_dir: dir.join("data"),
        admin_token: ADMIN.into(),
        enroll_token: ENROLL.into(),
        ..Default::default()
    };
    c.plugin.chunk_size = ByteSize::kib(64);
    c.plugin.security.allow_unsafe = true;
    c.plugin.security.require_checksum = false;
    c.jobs.lease_ttl = Seconds::secs(30);
    c
}

impl TestCoordinator {
    /// Starts a coordinator with [`test_config`] adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let running = RunningCoordinator::start(config.clone().validate().expect("valid config"))
            .await
            .expect("coordinator starts");
        Self {
            running: Some(running),
            config,
            dir,
        }
    }

    /// Stops the coordinator (graceful) and starts it again on the same data.
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".into();
        self.running = Some(
            RunningCoordinator::start(config.validate().expect("valid config"))
                .await
                .expect("coordinator restarts"),
        );
    }

    fn running(&self) -> &RunningCoordinator {
        self.running.as_ref().expect("coordinator is running")
    }

    /// Blob storage root.
    pub fn storage(&self) -> PathBuf {
        self.config.data_dir.join("plugins")
    }

    /// A channel to the gRPC port.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.running().url())
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    async fn authed(&self, token: &str) -> Authed {
        let value = format!("Bearer {token}").parse().expect("ascii token");
        InterceptedService::new(self.channel().await, Bearer(value))
    }

    /// PluginAdmin client with `token`.
    pub async fn plugins(&self, token: &str) -> PluginAdminClient<Authed> {
        PluginAdminClient::new(self.authed(token).await).max_decoding_message_size(80 << 20)
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
        AgentClient::new(self.authed(token).await).max_decoding_message_size(80 << 20)
    }

    /// Registers an agent and returns its token.
    pub async fn register(
        &self,
        agent_id: &str,
        labels: &[(&str, &str)],
        installed: Vec<pb::InstalledPlugin>,
    ) -> String {
        self.register_with(agent_id, labels, installed, "")
            .await
            .expect("register")
    }

    /// Registers an agent with a peer id.
    pub async fn register_with(
        &self,
        agent_id: &str,
        labels: &[(&str, &str)],
        installed: Vec<pb::InstalledPlugin>,
        peer_id: &str,
    ) -> Result<String, Status> {
        let mut c = self.agent(ENROLL).await;
        let resp = c
            .register(pb::RegisterRequest {
                agent_id: agent_id.into(),
                hostname: "test-host".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| pb::Label {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                peer_id: peer_id.into(),
                addrs: if peer_id.is_empty() {
                    vec![]
                } else {
                    vec!["/ip4/127.0.0.1/tcp/4001".into()]
                },
                installed_plugins: installed,
                ..Default::default()
            })
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
        let mut client = self.plugins(ADMIN).await;
        let mut msgs = vec![pb::PushPluginRequest {
            msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
                plugin_id: id.into(),
                version: version.into(),
                ..header
            })),
        }];
        for piece in data.chunks(256 * 1024) {
            msgs.push(pb::PushPluginRequest {
                msg: Some(pb::push_plugin_request::Msg::Data(piece.to_vec())),
            });
        }
        client
            .push_plugin(futures::stream::iter(msgs))
            .await
            .map(|r| r.into_inner())
    }

    /// Downloads chunk ranges (empty = all) and returns (messages, concatenated bytes).
    pub async fn download(
        &self,
        token: &str,
        req: pb::DownloadPluginRequest,
    ) -> Result<(Vec<pb::DownloadPluginResponse>, Vec<u8>), Status> {
        let mut client = self.agent(token).await;
        let mut stream = client.download_plugin(req).await?.into_inner();
        let mut msgs = Vec::new();
        let mut bytes = Vec::new();
        while let Some(msg) = stream.message().await? {
            bytes.extend_from_slice(&msg.data);
            msgs.push(msg);
        }
        Ok((msgs, bytes))
    }

    /// The text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.running().metrics_addr.expect("metrics enabled");
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
}

/// Deterministic test content of `len` bytes.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ u32::from(seed).wrapping_mul(0x85EB_CA6B);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
