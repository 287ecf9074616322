//! A tampering gRPC proxy for the `Agent` service: forwards every call to a real
//! coordinator (with the caller's `authorization` metadata) and, on `DownloadPlugin`,
//! can flip a byte of the next chunk it relays, slow chunks down, or refuse downloads.
//! It counts the chunk bytes it relays, so tests can assert what an agent fetched.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use arcade_proto::v1::agent_server::{Agent, AgentServer};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Knobs and counters of a running proxy.
#[derive(Debug, Default)]
pub struct Tamper {
    /// Flip one byte of the next relayed chunk (then clears itself).
    pub corrupt_next: AtomicBool,
    /// Refuse `DownloadPlugin` with `UNAVAILABLE`.
    pub refuse_downloads: AtomicBool,
    /// Delay before relaying each chunk, in microseconds.
    pub delay_per_chunk_us: AtomicU64,
    /// Chunk bytes relayed so far.
    pub relayed_bytes: AtomicU64,
    /// Chunks relayed so far.
    pub relayed_chunks: AtomicU64,
}

/// A running proxy.
pub struct AgentProxy {
    /// `http://ADDR` to give agents as their coordinator.
    pub url: String,
    /// Its knobs.
    pub tamper: Arc<Tamper>,
    stop: CancellationToken,
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Forward {
    upstream: Channel,
    tamper: Arc<Tamper>,
}

fn forward<T>(req: Request<T>) -> Request<T> {
    let auth = req.metadata().get(arcade_proto::AUTHORIZATION).cloned();
    let mut out = Request::new(req.into_inner());
    if let Some(v) = auth {
        out.metadata_mut().insert(arcade_proto::AUTHORIZATION, v);
    }
    out
}

impl Forward {
    fn client(&self) -> AgentClient<Channel> {
        AgentClient::new(self.upstream.clone()).max_decoding_message_size(arcade_proto::MAX_MESSAGE)
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::DownloadPluginResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Forward {
    async fn register(
        &self,
        r: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.client().register(forward(r)).await
    }
    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.client().heartbeat(forward(r)).await
    }
    async fn fetch_job(
        &self,
        r: Request<pb::FetchJobRequest>,
    ) -> Result<Response<pb::FetchJobResponse>, Status> {
        self.client().fetch_job(forward(r)).await
    }
    async fn report_job_result(
        &self,
        r: Request<pb::ReportJobResultRequest>,
    ) -> Result<Response<pb::ReportJobResultResponse>, Status> {
        self.client().report_job_result(forward(r)).await
    }
    async fn get_manifest(
        &self,
        r: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        self.client().get_manifest(forward(r)).await
    }
    async fn list_available_plugins(
        &self,
        r: Request<pb::ListAvailablePluginsRequest>,
    ) -> Result<Response<pb::ListAvailablePluginsResponse>, Status> {
        self.client().list_available_plugins(forward(r)).await
    }

    type DownloadPluginStream = Chunks;

    async fn download_plugin(
        &self,
        r: Request<pb::DownloadPluginRequest>,
    ) -> Result<Response<Chunks>, Status> {
        if self.tamper.refuse_downloads.load(Ordering::SeqCst) {
            return Err(Status::unavailable("proxy: downloads refused by the test"));
        }
        let upstream = self
            .client()
            .download_plugin(forward(r))
            .await?
            .into_inner();
        let tamper = self.tamper.clone();
        let stream = upstream.then(move |item| {
            let tamper = tamper.clone();
            async move {
                let mut msg = item?;
                let delay = tamper.delay_per_chunk_us.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                }
                if !msg.data.is_empty() && tamper.corrupt_next.swap(false, Ordering::SeqCst) {
                    let mid = msg.data.len() / 2;
                    msg.data[mid] ^= 0x5a;
                }
                tamper
                    .relayed_bytes
                    .fetch_add(msg.data.len() as u64, Ordering::SeqCst);
                tamper.relayed_chunks.fetch_add(1, Ordering::SeqCst);
                Ok(msg)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl AgentProxy {
    /// Starts a proxy on 127.0.0.1:0 in front of the coordinator at `upstream_url`.
    pub async fn start(upstream_url: &str) -> Self {
        let upstream = arcade_proto::client_endpoint(upstream_url)
            .expect("upstream url")
            .connect_lazy();
        let tamper = Arc::new(Tamper::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr: SocketAddr = listener.local_addr().expect("proxy addr");
        let stop = CancellationToken::new();
        let service = AgentServer::new(Forward {
            upstream,
            tamper: tamper.clone(),
        })
        .max_decoding_message_size(arcade_proto::MAX_MESSAGE)
        .max_encoding_message_size(arcade_proto::MAX_MESSAGE);
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            tamper,
            stop,
        }
    }
}
