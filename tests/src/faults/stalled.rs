//! Clients holding the coordinator's connections and buffered requests.
//!
//! `connection-flood`: one address (127.0.0.2) opens 200 TCP connections and sends
//! nothing; the coordinator (`grpc.max_connections_per_address = 20`) closes all but 20
//! as they are accepted, and an honest agent (from 127.0.0.1) works meanwhile.
//!
//! `stalled-body`: with a valid admin token, a `PushPlugin` sends its header message
//! and then nothing; the call is ended after `grpc.request_idle_timeout` (2 s here)
//! instead of holding its staging and buffers for ever.
//!
//! `stalled-requests`: against a real coordinator process, 200 requests without a valid
//! token — 4 streams on each of 50 connections — each announce an 8 MiB message, send
//! 4 MiB of it and stall. The coordinator must refuse them from their headers
//! (`UNAUTHENTICATED`) without reading their bodies, so its RSS stays within a bound
//! (before, tonic buffered each body — up to 800 MiB here — before the handler looked
//! at the token), and an honest agent keeps working meanwhile.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::ensure;
use arcade_proto::v1 as pb;
use bytes::Bytes;
use tonic::codegen::{Service as _, http};

use super::{Outcome, Scenario};
use crate::process::CoordinatorProcess;
use crate::{ADMIN, ENROLL};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("stalled-requests", || Box::pin(stalled_requests())),
    ("connection-flood", || Box::pin(connection_flood())),
    ("stalled-body", || Box::pin(stalled_body())),
];

/// A coordinator process with the test tokens and `extra` config lines.
fn coordinator(dir: &std::path::Path, extra: &str) -> anyhow::Result<CoordinatorProcess> {
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!("admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n{extra}"),
    )?;
    Ok(CoordinatorProcess::start(&config, &dir.join("data"), false))
}

const FLOOD: usize = 200;
const PER_ADDRESS: usize = 20;

async fn connection_flood() -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let proc = coordinator(
        dir.path(),
        &format!("[grpc]\nmax_connections_per_address = {PER_ADDRESS}\n"),
    )?;
    proc.register("honest", &[], vec![]).await;
    let addr: std::net::SocketAddr = proc
        .url
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| anyhow::anyhow!("coordinator address {}: {e}", proc.url))?;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        flood.push(socket.connect(addr).await?);
    }
    // Connections over the limit are closed by the coordinator: reading sees the end.
    let mut closed = 0usize;
    for conn in &mut flood {
        let mut byte = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(conn, &mut byte),
        )
        .await
        {
            if matches!(r, Ok(0) | Err(_)) {
                closed += 1;
            }
        }
    }
    let t = Instant::now();
    let token = proc.register("honest-2", &[], vec![]).await;
    proc.agent(&token)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await?;
    let honest_ms = t.elapsed().as_millis();
    ensure!(
        closed == FLOOD - PER_ADDRESS,
        "property `connections beyond grpc.max_connections_per_address are closed` failed: {closed} of {FLOOD} closed (limit {PER_ADDRESS})"
    );
    ensure!(honest_ms < 5000, "an honest agent needed {honest_ms} ms");
    drop(flood);
    Ok(Outcome {
        outcome: format!(
            "{FLOOD} idle connections from one address: {closed} closed on accept (limit {PER_ADDRESS}); an honest agent registered and heart-beat in {honest_ms} ms meanwhile"
        ),
        ..Default::default()
    })
}

async fn stalled_body() -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let proc = coordinator(dir.path(), "[grpc]\nrequest_idle_timeout = \"2s\"\n")?;
    let channel = arcade_proto::client_endpoint(&proc.url)?.connect().await?;
    let mut svc = channel.clone();
    // A push header message (a valid PushPluginRequest), then silence.
    let header = prost::Message::encode_to_vec(&pb::PushPluginRequest {
        msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
            plugin_id: "stall/push".into(),
            version: "1.0.0".into(),
            expected_sha256: "ab".repeat(32),
            ..Default::default()
        })),
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(header.len() as u32).to_be_bytes());
    framed.extend_from_slice(&header);
    let req = http::Request::builder()
        .method("POST")
        .uri("/arcade.v1.PluginAdmin/PushPlugin")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(arcade_proto::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .body(tonic::body::Body::new(Silent {
            first: Some(Bytes::from(framed)),
        }))?;
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    let t = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(15), svc.call(req)).await;
    let resp = match answered {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => anyhow::bail!("the push call failed in transport: {e}"),
        Err(_) => anyhow::bail!(
            "property `a stalled request body is ended after grpc.request_idle_timeout` failed: no answer within 15 s"
        ),
    };
    let after = t.elapsed();
    let status = tonic::Status::from_header_map(resp.headers());
    ensure!(
        status.as_ref().is_some_and(|s| s.code() != tonic::Code::Ok),
        "the stalled push must end with an error status, got {status:?}"
    );
    ensure!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(10),
        "the stalled push must end at grpc.request_idle_timeout (2 s), ended after {after:?} with {status:?}"
    );
    Ok(Outcome {
        outcome: format!(
            "a push that stalled after its header (valid admin token) was ended after {:.1} s ({:?})",
            after.as_secs_f64(),
            status.map(|s| s.code())
        ),
        ..Default::default()
    })
}

/// A request body that sends `first` and then nothing, ever.
struct Silent {
    first: Option<Bytes>,
}

impl http_body::Body for Silent {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

const CONNECTIONS: usize = 50;
const STREAMS_EACH: usize = 4;
const SENT: usize = 4 << 20;
const ANNOUNCED: u32 = (8 << 20) - 64;
/// Most RSS growth allowed while the stalled requests are open.
const RSS_BOUND: u64 = 128 << 20;

/// A request body that sends a gRPC message prefix announcing `ANNOUNCED` bytes, then
/// `SENT` bytes of it, then nothing, ever.
struct Stalled {
    left: usize,
    prefixed: bool,
}

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if !self.prefixed {
            self.prefixed = true;
            let mut head = vec![0u8];
            head.extend_from_slice(&ANNOUNCED.to_be_bytes());
            return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(head)))));
        }
        if self.left == 0 {
            // Stalled: never ready again, never ends.
            return Poll::Pending;
        }
        let n = self.left.min(256 << 10);
        self.left -= n;
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; n])))))
    }
}

async fn stalled_requests() -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let proc = coordinator(dir.path(), "")?;
    // A first honest call, so the baseline includes a warmed-up server.
    proc.register("honest", &[], vec![]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc.rss().unwrap_or(0);

    let (tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let channel = arcade_proto::client_endpoint(&proc.url)?.connect().await?;
        for s in 0..STREAMS_EACH {
            let mut svc = channel.clone();
            let tx = tx.clone();
            tasks.spawn(async move {
                let mut req = http::Request::builder()
                    .method("POST")
                    .uri("/arcade.v1.Agent/ReportJobResult")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
                if s % 2 == 1 {
                    req = req.header(arcade_proto::AUTHORIZATION, "Bearer not-a-known-token");
                }
                let Ok(req) = req.body(tonic::body::Body::new(Stalled {
                    left: SENT,
                    prefixed: false,
                })) else {
                    return;
                };
                if std::future::poll_fn(|cx| svc.poll_ready(cx)).await.is_err() {
                    return;
                }
                if let Ok(resp) = svc.call(req).await {
                    let _ = tx.send(tonic::Status::from_header_map(resp.headers()));
                }
            });
        }
    }
    drop(tx);
    // Let the bytes flow for a while.
    let mut refused = 0usize;
    let mut other = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while let Ok(Some(status)) = tokio::time::timeout_at(until.into(), answers.recv()).await {
        match status {
            Some(s) if s.code() == tonic::Code::Unauthenticated => refused += 1,
            s => other.push(format!("{s:?}")),
        }
    }
    let during = proc.rss().unwrap_or(0);

    // An honest agent works meanwhile.
    let t = Instant::now();
    let token = proc.register("honest-2", &[], vec![]).await;
    proc.agent(&token)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await?;
    let honest_ms = t.elapsed().as_millis();
    tasks.abort_all();

    let growth = during.saturating_sub(before);
    ensure!(
        growth <= RSS_BOUND,
        "{} stalled unauthenticated requests grew the coordinator's RSS by {} MiB (bound {} MiB; {refused} refused from their headers)",
        CONNECTIONS * STREAMS_EACH,
        growth >> 20,
        RSS_BOUND >> 20
    );
    ensure!(
        refused == CONNECTIONS * STREAMS_EACH,
        "only {refused} of {} stalled requests were refused from their headers; others: {other:?}",
        CONNECTIONS * STREAMS_EACH
    );
    ensure!(honest_ms < 5000, "an honest agent needed {honest_ms} ms");
    Ok(Outcome {
        outcome: format!(
            "{} requests without a known token, each announcing 8 MiB and stalling after 4 MiB on {CONNECTIONS} connections: all refused UNAUTHENTICATED from their headers, coordinator RSS {} -> {} MiB (bound +{} MiB); an honest agent registered and heart-beat in {honest_ms} ms meanwhile",
            CONNECTIONS * STREAMS_EACH,
            before >> 20,
            during >> 20,
            RSS_BOUND >> 20
        ),
        ..Default::default()
    })
}
