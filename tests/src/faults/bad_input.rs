//! Malformed and oversized input on every RPC, absurd config values, hostile plugin ids.
//!
//! `bad-input`, against a real `arcade-coordinator` process (its stderr captured):
//!
//! 1. Every RPC of every service the coordinator serves (the `arcade.v1` services
//!    enumerated from the compiled descriptor set, plus health and reflection) gets raw
//!    HTTP/2 gRPC requests, with valid credentials: malformed protobuf bodies
//!    (truncated field, truncated varint, invalid wire type, field number 0, unclosed
//!    group), broken frames (no message, truncated frame, compressed flag without an
//!    encoding) and oversized frames (a length prefix of ~2 GiB, and a real 16 MiB
//!    message, above every decode limit). Each must come back as a gRPC status of the
//!    kind expected (never a reset stream or a dropped connection), and the coordinator
//!    must still serve a normal request afterwards.
//! 2. Absurd config values for the coordinator and the agent (zero, negative, huge
//!    sizes, durations, rates, ports, empty or spaced tokens, bad paths, unknown keys):
//!    `validate()` (or the loader) fails naming the key; the real binaries given a bad
//!    config file exit non-zero with one line on stderr naming the problem. Values that
//!    are accepted but extreme (huge timeouts, TTLs and rates) must still run a job.
//! 3. Plugin ids with `..`, a `/` prefix, NUL, unicode, upper case, 10 KiB and 1 MiB
//!    lengths, and bad versions: push, get, enable, delete, manifest, download and job
//!    creation all answer INVALID_ARGUMENT with a short message, and nothing is stored.
//!    Bad content ids and agent registrations are refused the same way.
//!
//! At the end, the coordinator's stderr must hold no panic.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use arcade_agent::config::{AgentConfig, BuiltinPlugin, HoursTtl};
use arcade_coordinator::CoordinatorConfig;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::process::workspace_bin;
use crate::{ADMIN, Conn, ENROLL, TestCoordinator, content, create_job, wait_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("bad-input", || Box::pin(bad_input()))];

/// Longest status message accepted for hostile input (no echo of megabytes).
const MAX_MESSAGE_LEN: usize = 1024;

/// Checks made so far, and the ones that did not hold.
#[derive(Default)]
struct Tally {
    checks: u32,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, held: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !held {
            self.failures.push(what());
        }
    }

    fn status(&mut self, what: &str, expected: &[Code], got: Result<(), tonic::Status>) {
        match got {
            Ok(()) => self.check(false, || {
                format!("{what}: expected {expected:?}, the call succeeded")
            }),
            Err(s) => {
                let held = expected.contains(&s.code())
                    && !s.message().is_empty()
                    && s.message().len() <= MAX_MESSAGE_LEN;
                self.check(held, || {
                    format!(
                        "{what}: expected {expected:?} with a short message, got {:?}: {}",
                        s.code(),
                        s.message().chars().take(200).collect::<String>()
                    )
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// 1. Raw gRPC frames.

/// Reads a protobuf varint.
fn varint(b: &mut &[u8]) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().context("truncated varint")?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

/// The fields of one protobuf message: (number, varint value or bytes).
fn fields(mut b: &[u8]) -> anyhow::Result<Vec<(u64, u64, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, varint(&mut b)?, &[][..])),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                ensure!(b.len() >= n, "truncated fixed field");
                b = &b[n..];
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?)?;
                ensure!(b.len() >= len, "truncated length-delimited field");
                out.push((num, 0, &b[..len]));
                b = &b[len..];
            }
            w => bail!("unexpected wire type {w} in a descriptor"),
        }
    }
    Ok(out)
}

/// `/package.Service/Method` of every RPC in an encoded `FileDescriptorSet`, and
/// whether its request is a stream.
fn rpc_paths(descriptor_set: &[u8]) -> anyhow::Result<Vec<(String, bool)>> {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).context("descriptor name is not UTF-8");
    let mut paths = Vec::new();
    for (num, _, file) in fields(descriptor_set)? {
        if num != 1 {
            continue;
        }
        let file = fields(file)?;
        let package = match file.iter().find(|(n, _, _)| *n == 2) {
            Some((_, _, p)) => text(p)?,
            None => String::new(),
        };
        for (_, _, service) in file.iter().filter(|(n, _, _)| *n == 6) {
            let service = fields(service)?;
            let name = service
                .iter()
                .find(|(n, _, _)| *n == 1)
                .map(|(_, _, b)| text(b))
                .transpose()?
                .context("service without a name")?;
            for (_, _, method) in service.iter().filter(|(n, _, _)| *n == 2) {
                let method = fields(method)?;
                let m = method
                    .iter()
                    .find(|(n, _, _)| *n == 1)
                    .map(|(_, _, b)| text(b))
                    .transpose()?
                    .context("method without a name")?;
                let streaming = method.iter().any(|(n, v, _)| *n == 5 && *v != 0);
                paths.push((format!("/{package}.{name}/{m}"), streaming));
            }
        }
    }
    Ok(paths)
}

/// What a raw call came back with: a gRPC status (OK included) or how it broke.
async fn raw_call(
    ch: &Channel,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Result<tonic::Status, String> {
    use tonic::codegen::{Body as _, Service as _, http};
    let mut svc = ch.clone();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header(arcade_proto::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(tonic::body::Body::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    std::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .map_err(|e| format!("connection lost: {e:?}"))?;
    let resp = svc
        .call(req)
        .await
        .map_err(|e| format!("connection lost: {e:?}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
        return Ok(s);
    }
    let mut body = resp.into_body();
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return Err("the response ended without a grpc-status".into()),
            Some(Err(s)) => return Err(format!("the stream broke: {s}")),
            Some(Ok(frame)) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return tonic::Status::from_header_map(&trailers)
                        .ok_or_else(|| "trailers without a grpc-status".into());
                }
            }
        }
    }
}

/// One gRPC frame (uncompressed) around `msg`, as the body text.
fn frame(msg: &str) -> String {
    let len = u32::try_from(msg.len()).expect("test frames are small");
    let mut s = String::from("\0");
    for b in len.to_be_bytes() {
        // Test messages stay below 128 bytes per length byte, so each is one char.
        s.push(char::from(b));
    }
    s.push_str(msg);
    s
}

/// The bad bodies: (name, body, acceptable codes). Bodies are text (valid UTF-8) by
/// construction: the bytes that matter are all below 0x80 or whole UTF-8 sequences.
fn bad_bodies() -> Vec<(&'static str, String, &'static [Code])> {
    const DECODE: &[Code] = &[Code::Internal, Code::InvalidArgument];
    const SIZE: &[Code] = &[Code::OutOfRange, Code::ResourceExhausted];
    let truncated_frame = {
        let mut s = String::from("\0\0\0\0d"); // claims 100 bytes
        s.push_str("0123456789");
        s
    };
    let mut real_oversize = String::from("\0\u{1}\0\0\0"); // 16 MiB, every limit is lower
    real_oversize.push_str(&"a".repeat(16 << 20));
    vec![
        (
            "truncated length-delimited field",
            frame("\n\u{7f}"),
            DECODE,
        ),
        ("truncated varint", frame("\u{8}é"), DECODE),
        ("invalid wire type 7", frame("\u{f}"), DECODE),
        ("field number 0", frame("\0"), DECODE),
        ("unclosed group", frame("\u{b}"), DECODE),
        ("no message at all", String::new(), DECODE),
        ("truncated frame", truncated_frame, DECODE),
        (
            "compressed flag, no grpc-encoding",
            {
                let mut s = frame("");
                s.replace_range(0..1, "\u{1}");
                s
            },
            DECODE,
        ),
        (
            "length prefix of 2 GiB",
            "\0\u{7f}\u{7f}\u{7f}\u{7f}abc".into(),
            SIZE,
        ),
        ("16 MiB message", real_oversize, SIZE),
    ]
}

/// Whether a status message reads like the decode/size error it should be (and not,
/// say, a handler's internal failure on a half-decoded request).
fn plausible(code: Code, message: &str) -> bool {
    let m = message.to_lowercase();
    match code {
        Code::Internal | Code::InvalidArgument => {
            m.contains("decode")
                || m.contains("eof")
                || m.contains("missing request message")
                || m.contains("compress")
        }
        _ => m.contains("large") || m.contains("limit") || m.contains("size"),
    }
}

async fn malformed_frames(
    conn: &Conn,
    agent_token: &str,
    tally: &mut Tally,
) -> anyhow::Result<(u32, usize, String)> {
    let mut paths = rpc_paths(arcade_proto::FILE_DESCRIPTOR_SET)?;
    ensure!(
        paths
            .iter()
            .any(|(p, _)| p == "/arcade.v1.Agent/DownloadPlugin")
            && paths
                .iter()
                .any(|(p, s)| p == "/arcade.v1.PluginAdmin/PushPlugin" && *s),
        "the descriptor set lists no Agent/DownloadPlugin or streaming PushPlugin: {paths:?}"
    );
    paths.extend([
        ("/grpc.health.v1.Health/Check".to_owned(), false),
        ("/grpc.health.v1.Health/Watch".to_owned(), false),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned(),
            true,
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_owned(),
            true,
        ),
    ]);
    let ch = conn.channel().await;
    let bodies = bad_bodies();
    let mut sent = 0;
    let mut codes = std::collections::BTreeMap::new();
    for (path, streaming) in &paths {
        let token = if path.ends_with("/Register") {
            Some(ENROLL)
        } else if path.starts_with("/arcade.v1.Agent/") {
            Some(agent_token)
        } else if path.starts_with("/arcade.v1.") {
            Some(ADMIN)
        } else {
            None
        };
        for (kind, body, expected) in &bodies {
            if body.is_empty() && *streaming {
                // An empty request stream is legal gRPC: the handler decides.
                continue;
            }
            sent += 1;
            let got = tokio::time::timeout(
                Duration::from_secs(20),
                raw_call(&ch, path, token, body.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("no answer within 20 s".into()));
            // tonic-reflection ends its response stream cleanly (OK, nothing sent) when
            // the request stream fails to decode: not an error status, but a clean end.
            let clean_end =
                |s: &tonic::Status| s.code() == Code::Ok && path.starts_with("/grpc.reflection.");
            let seen = match &got {
                Ok(s) if clean_end(s) => "reflection: clean end".to_owned(),
                Ok(s) => format!("{:?}", s.code()),
                Err(_) => "broken".to_owned(),
            };
            *codes.entry(seen).or_insert(0u32) += 1;
            match got {
                Ok(s) => tally.check(
                    clean_end(&s)
                        || expected.contains(&s.code()) && plausible(s.code(), s.message()),
                    || {
                        format!(
                            "{path} with {kind}: expected {expected:?}, got {:?}: {}",
                            s.code(),
                            s.message()
                        )
                    },
                ),
                Err(broke) => tally.check(false, || format!("{path} with {kind}: {broke}")),
            }
        }
    }
    // Still serving, on the same connection and on a new one.
    let listed = conn
        .plugins(ADMIN)
        .await
        .list_plugins(pb::ListPluginsRequest::default())
        .await;
    tally.check(listed.is_ok(), || {
        format!("after the malformed requests ListPlugins failed: {listed:?}")
    });
    let ok = raw_call(&ch, "/arcade.v1.Fleet/ListAgents", Some(ADMIN), frame("")).await;
    tally.check(ok.as_ref().is_ok_and(|s| s.code() == Code::Ok), || {
        format!("after the malformed requests a raw ListAgents failed: {ok:?}")
    });
    let codes = codes
        .iter()
        .map(|(c, n)| format!("{c} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((sent, paths.len(), codes))
}

// ---------------------------------------------------------------------------------
// 2. Configs.

type CoordMutation = fn(&mut CoordinatorConfig);
type AgentMutation = fn(&mut AgentConfig);

fn coordinator_cases() -> Vec<(&'static str, CoordMutation)> {
    const HUGE: Seconds = Seconds::secs(10 * 365 * 86_400);
    vec![
        ("listen", |c| c.listen = String::new()),
        ("listen", |c| c.listen = "127.0.0.1:99999".into()),
        ("listen", |c| c.listen = "127.0.0.1:-1".into()),
        ("metrics_listen", |c| c.metrics_listen = "nowhere".into()),
        ("metrics_listen", |c| {
            c.metrics_listen = "0.0.0.0:70000".into()
        }),
        ("data_dir", |c| c.data_dir = PathBuf::new()),
        ("admin_token", |c| c.admin_token = "short".into()),
        ("admin_token", |c| c.admin_token = "has space in it".into()),
        ("admin_token", |c| c.admin_token = "x".repeat(10_000)),
        ("enroll_token", |c| c.enroll_token = "tab\there-123".into()),
        ("enroll_token", |c| c.enroll_token = c.admin_token.clone()),
        ("plugin.max_plugin_size", |c| {
            c.plugin.max_plugin_size = ByteSize(0)
        }),
        ("plugin.max_plugin_size", |c| {
            c.plugin.max_plugin_size = ByteSize(u64::MAX)
        }),
        ("plugin.chunk_size", |c| c.plugin.chunk_size = ByteSize(0)),
        ("plugin.chunk_size", |c| {
            c.plugin.chunk_size = ByteSize(3000)
        }),
        ("plugin.chunk_size", |c| {
            c.plugin.chunk_size = ByteSize::gib(1)
        }),
        ("plugin.chunk_size", |c| {
            c.plugin.max_plugin_size = ByteSize(1 << 40);
            c.plugin.chunk_size = ByteSize::kib(1);
        }),
        ("plugin.cache_ttl", |c| {
            c.plugin.cache_ttl = Seconds::secs(0)
        }),
        ("jobs.lease_ttl", |c| c.jobs.lease_ttl = Seconds::secs(0)),
        ("jobs.lease_ttl", |c| c.jobs.lease_ttl = HUGE),
        ("jobs.heartbeat_interval", |c| {
            c.jobs.heartbeat_interval = Seconds::secs(0)
        }),
        ("jobs.heartbeat_interval", |c| {
            c.jobs.heartbeat_interval = c.jobs.lease_ttl
        }),
        ("jobs.max_attempts", |c| c.jobs.max_attempts = 0),
        ("jobs.max_attempts", |c| c.jobs.max_attempts = u32::MAX),
        ("jobs.long_poll_max", |c| c.jobs.long_poll_max = HUGE),
        ("jobs.max_output_tail", |c| {
            c.jobs.max_output_tail = ByteSize(u64::MAX)
        }),
        ("serve.max_streams", |c| c.serve.max_streams = 0),
        ("serve.max_streams", |c| c.serve.max_streams = u32::MAX),
        ("serve.max_redirects", |c| c.serve.max_redirects = u32::MAX),
        ("mesh.ticket_ttl", |c| c.mesh.ticket_ttl = Seconds::secs(0)),
        ("mesh.ticket_ttl", |c| c.mesh.ticket_ttl = HUGE),
    ]
}

fn agent_cases() -> Vec<(&'static str, AgentMutation)> {
    const HUGE: Seconds = Seconds::secs(10 * 365 * 86_400);
    vec![
        ("id", |c| c.id = "bad id".into()),
        ("id", |c| c.id = "../../etc".into()),
        ("id", |c| c.id = "x".repeat(10_000)),
        ("id", |c| c.id = "nul\0id".into()),
        ("coordinator", |c| c.coordinator = String::new()),
        ("coordinator", |c| {
            c.coordinator = "ftp://127.0.0.1:1".into()
        }),
        // Plaintext to a remote host without tls.insecure (validated, never dialled).
        ("coordinator", |c| {
            c.coordinator = "http://10.1.2.3:50051".into()
        }),
        ("coordinator", |c| {
            c.coordinator = "https://127.0.0.1:1".into();
            c.tls.ca = "/nonexistent/ca.pem".into()
        }),
        ("tls.cert", |c| c.tls.cert = "/some/cert.pem".into()),
        ("download.request_timeout", |c| {
            c.download.request_timeout = Seconds::secs(0)
        }),
        ("enroll_token", |c| c.enroll_token = "has space".into()),
        ("enroll_token", |c| c.enroll_token = "x".repeat(10_000)),
        ("metrics_listen", |c| {
            c.metrics_listen = "127.0.0.1:99999".into()
        }),
        ("max_concurrent_jobs", |c| c.max_concurrent_jobs = 0),
        ("max_concurrent_jobs", |c| c.max_concurrent_jobs = u32::MAX),
        ("log_format", |c| c.log_format = "xml".into()),
        ("labels", |c| {
            c.labels.insert("bad key".into(), "v".into());
        }),
        ("labels", |c| {
            c.labels.insert("k".into(), "x".repeat(10_000));
        }),
        ("download.concurrent", |c| c.download.concurrent = 0),
        ("download.concurrent", |c| c.download.concurrent = u32::MAX),
        ("download.timeout", |c| {
            c.download.timeout = Seconds::secs(0)
        }),
        ("download.retry", |c| c.download.retry = u32::MAX),
        ("download.backoff", |c| c.download.backoff = HUGE),
        ("cache.max_size", |c| c.cache.max_size = ByteSize(0)),
        ("jobs.stage_timeout", |c| {
            c.jobs.stage_timeout = Seconds::secs(0)
        }),
        ("jobs.command_timeout", |c| c.jobs.command_timeout = HUGE),
        ("jobs.max_output", |c| c.jobs.max_output = ByteSize(1)),
        ("jobs.max_output", |c| {
            c.jobs.max_output = ByteSize(u64::MAX)
        }),
        ("jobs.shutdown_grace", |c| c.jobs.shutdown_grace = HUGE),
        ("jobs.poll_wait", |c| c.jobs.poll_wait = Seconds::secs(0)),
        ("jobs.poll_wait", |c| c.jobs.poll_wait = HUGE),
        ("mesh.max_uploads", |c| c.mesh.max_uploads = u32::MAX),
        ("mesh.max_connections", |c| c.mesh.max_connections = 0),
        ("mesh.provider_republish", |c| {
            c.mesh.provider_republish = Seconds::secs(0)
        }),
        ("mesh.provider_republish", |c| {
            c.mesh.provider_republish = c.mesh.provider_ttl
        }),
        ("mesh.listen", |c| {
            c.mesh.listen = vec!["not-a-multiaddr".into()]
        }),
        ("mesh.listen", |c| c.mesh.listen = Vec::new()),
        ("mesh.advertise", |c| {
            c.mesh.advertise = vec!["/ip4/999.0.0.1/tcp/1".into()]
        }),
        ("builtin[0].plugin", |c| {
            c.builtin.push(BuiltinPlugin {
                plugin: "../evil@1.0.0".into(),
                file: "x".into(),
            })
        }),
        ("builtin[0].file", |c| {
            c.builtin.push(BuiltinPlugin {
                plugin: "ok/p@1.0.0".into(),
                file: "/etc/passwd".into(),
            })
        }),
        ("builtin[0].file", |c| {
            c.builtin.push(BuiltinPlugin {
                plugin: "ok/p@1.0.0".into(),
                file: "../../x".into(),
            })
        }),
    ]
}

/// TOML texts the loaders must refuse, naming the key: (key, text).
const COORDINATOR_FILES: &[(&str, &str)] = &[
    ("listen", "listen = 50051\n"),
    ("jobs.lease_ttl", "[jobs]\nlease_ttl = -5\n"),
    (
        "plugin.max_plugin_size",
        "[plugin]\nmax_plugin_size = \"12 parsecs\"\n",
    ),
    (
        "plugin.max_plugin_size",
        "[plugin]\nmax_plugin_size = 9223372036854775807\n",
    ),
    ("serve.max_streams", "[serve]\nmax_streams = -1\n"),
    ("serve.stall_timeout", "[serve]\nstall_timeout = \"0s\"\n"),
    ("tls.cert", "[tls]\ncert = \"/x.pem\"\n"),
    ("tls.cert", "listen = \"0.0.0.0:0\"\n"),
    (
        "serve.egress_rate",
        "[serve]\negress_rate = \"99999999999999TiB\"\n",
    ),
    (
        "mesh.ticket_ttl",
        "[mesh]\nticket_ttl = \"99999999999999999d\"\n",
    ),
    ("bogus", "bogus = 1\n"),
];

const AGENT_FILES: &[(&str, &str)] = &[
    (
        "download.timeout",
        "[download]\ntimeout = \"5 fortnights\"\n",
    ),
    ("cache.eviction", "[cache]\neviction = \"random\"\n"),
    ("cache.ttl", "[cache]\nttl = -1\n"),
    ("max_concurrent_jobs", "max_concurrent_jobs = -1\n"),
    ("mesh.listen", "[mesh]\nlisten = \"/ip4/0.0.0.0/tcp/0\"\n"),
    ("mesh.upload_rate", "[mesh]\nupload_rate = 1e30\n"),
    ("labels", "labels = 5\n"),
];

fn names_key(err: &str, key: &str) -> bool {
    err.contains(&format!("`{key}`"))
}

fn validation(tally: &mut Tally, dir: &Path) -> anyhow::Result<u32> {
    let mut cases = 0;
    for (key, mutate) in coordinator_cases() {
        cases += 1;
        let mut c = crate::test_config(dir);
        mutate(&mut c);
        let got = std::panic::catch_unwind(move || c.validate().map(|_| ()));
        tally.check(
            matches!(&got, Ok(Err(e)) if names_key(&e.to_string(), key)),
            || {
                format!(
                    "coordinator config with a bad `{key}`: {:?}",
                    got.map(|r| r.map_err(|e| e.to_string()))
                )
            },
        );
    }
    for (key, mutate) in agent_cases() {
        cases += 1;
        let mut c = crate::agents::agent_config(dir, "http://127.0.0.1:1", ENROLL, "a1");
        mutate(&mut c);
        let got = std::panic::catch_unwind(move || c.validate().map(|_| ()));
        tally.check(
            matches!(&got, Ok(Err(e)) if names_key(&e.to_string(), key)),
            || {
                format!(
                    "agent config with a bad `{key}`: {:?}",
                    got.map(|r| r.map_err(|e| e.to_string()))
                )
            },
        );
    }
    let file = dir.join("bad.toml");
    for (key, text) in COORDINATOR_FILES {
        cases += 1;
        std::fs::write(&file, text)?;
        // Loaded and validated, as the binary does.
        let got = CoordinatorConfig::load(Some(&file), |_| None)
            .and_then(|c| c.validate())
            .map(|_| ());
        tally.check(
            matches!(&got, Err(e) if names_key(&e.to_string(), key)),
            || format!("coordinator file {text:?}: expected an error naming `{key}`, got {got:?}"),
        );
    }
    for (key, text) in AGENT_FILES {
        cases += 1;
        std::fs::write(&file, text)?;
        let got = AgentConfig::load(Some(&file), |_| None).map(|_| ());
        tally.check(
            matches!(&got, Err(e) if names_key(&e.to_string(), key)),
            || format!("agent file {text:?}: expected an error naming `{key}`, got {got:?}"),
        );
    }
    Ok(cases)
}

/// Runs `bin args…` (at most 20 s) and checks it fails with one line naming `says`.
fn bad_start(tally: &mut Tally, bin: &str, args: &[&std::ffi::OsStr], says: &str) {
    let what = format!(
        "{bin} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let child = Command::new(workspace_bin(bin))
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return tally.check(false, || format!("{what}: cannot start: {e}")),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let line = stderr.trim();
    tally.check(
        status.is_some_and(|s| !s.success())
            && line.lines().count() == 1
            && line.contains(says)
            && !stderr.contains("panicked"),
        || format!("{what}: expected a non-zero exit with one line naming {says:?}, got {status:?} and stderr {stderr:?}"),
    );
}

async fn binaries(tally: &mut Tally, dir: &Path) -> anyhow::Result<u32> {
    let files: &[(&str, &str, &str)] = &[
        (
            "arcade-coordinator",
            "[jobs]\nmax_attempts = 0\n",
            "`jobs.max_attempts`",
        ),
        (
            "arcade-coordinator",
            "listen = \"127.0.0.1:99999\"\n",
            "`listen`",
        ),
        (
            "arcade-coordinator",
            "[serve]\nmax_streams = -1\n",
            "`serve.max_streams`",
        ),
        ("arcade-coordinator", "[[[\n", "not valid TOML"),
        (
            "arcade-agent",
            "id = \"a1\"\n[download]\nconcurrent = 0\n",
            "`download.concurrent`",
        ),
        (
            "arcade-agent",
            "id = \"a1\"\ncoordinator = \"ftp://x\"\n",
            "`coordinator`",
        ),
        (
            "arcade-agent",
            "id = \"a1\"\n[mesh]\nprovider_republish = \"1h\"\n",
            "`mesh.provider_republish`",
        ),
        (
            "arcade-agent",
            "id = \"a1\"\nenroll_token = \"two words\"\n",
            "`enroll_token`",
        ),
    ];
    let dir = dir.to_owned();
    let mut t = std::mem::take(tally);
    let t = tokio::task::spawn_blocking(move || -> anyhow::Result<(Tally, u32)> {
        let mut n = 0;
        for (i, (bin, text, says)) in files.iter().enumerate() {
            n += 1;
            let path = dir.join(format!("bad-{i}.toml"));
            std::fs::write(&path, text)?;
            bad_start(&mut t, bin, &["--config".as_ref(), path.as_os_str()], says);
        }
        // Bad paths: a data directory that is a regular file.
        let not_a_dir = dir.join("not-a-dir");
        std::fs::write(&not_a_dir, "x")?;
        n += 1;
        bad_start(
            &mut t,
            "arcade-coordinator",
            &[
                "--data-dir".as_ref(),
                not_a_dir.as_os_str(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--metrics-listen".as_ref(),
                "off".as_ref(),
                "--admin-token".as_ref(),
                ADMIN.as_ref(),
                "--enroll-token".as_ref(),
                ENROLL.as_ref(),
            ],
            "data_dir",
        );
        n += 1;
        bad_start(
            &mut t,
            "arcade-agent",
            &[
                "--id".as_ref(),
                "a1".as_ref(),
                "--data-dir".as_ref(),
                not_a_dir.as_os_str(),
                "--metrics-listen".as_ref(),
                "off".as_ref(),
                "--coordinator".as_ref(),
                "http://127.0.0.1:1".as_ref(),
            ],
            "not-a-dir",
        );
        Ok((t, n))
    })
    .await
    .context("binary checks panicked")??;
    *tally = t.0;
    Ok(t.1)
}

/// Extreme values the validators accept must still work: one job end to end.
async fn extreme_but_accepted(tally: &mut Tally) -> anyhow::Result<()> {
    let huge = Seconds(Duration::from_secs(i64::MAX as u64));
    let c = TestCoordinator::start(|c| {
        c.serve.herd_window = huge;
        c.serve.egress_rate = ByteSize(u64::MAX);
        c.plugin.cache_ttl = huge;
        c.plugin.max_plugin_size = ByteSize(1 << 40);
        c.plugin.chunk_size = ByteSize::mib(64);
    })
    .await;
    let mut data = b"#!/bin/sh\nexit 0\n".to_vec();
    data.extend(content(300_000, 9));
    c.push("extreme/p", "1.0.0", &data, Default::default())
        .await
        .context("push with extreme coordinator settings")?;
    let mut agent = TestAgent::start(&c.url, ENROLL, "extreme", move |cfg, _| {
        cfg.download.timeout = huge;
        cfg.download.retry = 100;
        cfg.cache.ttl = HoursTtl(huge);
        cfg.cache.max_size = ByteSize(u64::MAX);
        cfg.mesh.upload_rate = ByteSize(u64::MAX);
        cfg.mesh.provider_ttl = huge;
        cfg.mesh.provider_republish = Seconds(huge.get() / 2);
        cfg.mesh.max_uploads = 0;
        cfg.jobs.shutdown_grace = Seconds::secs(0);
    })
    .await;
    let id = create_job(&c, "extreme/p", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    tally.check(job.status() == pb::JobStatus::Succeeded, || {
        format!(
            "a job with extreme but accepted settings (huge timeouts, TTLs, rates) failed: {}",
            job.error_message
        )
    });
    agent.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------
// 3. Plugin ids, versions, content ids, agent registrations.

fn bad_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "",
        "..",
        ".",
        "../etc/passwd",
        "a/../b",
        "./a",
        "/abs",
        "/",
        "abs/",
        "a//b",
        "a\0b",
        "\0",
        "ünïcødé",
        "plugin/名前",
        "UPPER/case",
        "a b",
        "a\nb",
        "a\\b",
        "-lead",
        "a/%2e%2e",
    ]
    .map(String::from)
    .to_vec();
    ids.push("x".repeat(10 * 1024));
    ids.push("a/".repeat(5 * 1024) + "a");
    ids.push("x".repeat(1 << 20));
    ids
}

fn bad_versions() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "1",
        "1.0",
        "v1.0.0",
        "1.0.0\0",
        "1.0.0/../../x",
        "１.０.０",
        "1.0.0 ",
        "latest",
        "../1.0.0",
        "^",
        "~x",
        ">=1.0.0 <",
        "^1.2 || 2",
        "=1.0.0\0",
    ]
    .map(String::from)
    .to_vec();
    v.push("9".repeat(10 * 1024));
    v
}

/// Every RPC that names a plugin, called for `id`@`version` (admin or agent token).
async fn plugin_rpcs(
    conn: &Conn,
    agent_token: &str,
    id: &str,
    version: &str,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let (id, version) = (id.to_owned(), version.to_owned());
    let mut out = Vec::new();
    let push = conn
        .push(&id, &version, b"#!/bin/sh\nexit 0\n", Default::default())
        .await
        .map(drop);
    out.push(("PushPlugin", push));
    let mut admin = conn.plugins(ADMIN).await;
    let got = admin
        .get_plugin(pb::GetPluginRequest {
            plugin_id: id.clone(),
            version: version.clone(),
        })
        .await
        .map(drop);
    out.push(("GetPlugin", got));
    let got = admin
        .set_plugin_enabled(pb::SetPluginEnabledRequest {
            plugin_id: id.clone(),
            version: version.clone(),
            enabled: true,
        })
        .await
        .map(drop);
    out.push(("SetPluginEnabled", got));
    let got = admin
        .delete_plugin(pb::DeletePluginRequest {
            plugin_id: id.clone(),
            version: version.clone(),
        })
        .await
        .map(drop);
    out.push(("DeletePlugin", got));
    let got = conn
        .agent(agent_token)
        .await
        .get_manifest(pb::GetManifestRequest {
            plugin_id: id.clone(),
            version: version.clone(),
            ..Default::default()
        })
        .await
        .map(drop);
    out.push(("GetManifest", got));
    let got = conn
        .download(
            agent_token,
            pb::DownloadPluginRequest {
                plugin_id: id.clone(),
                version: version.clone(),
                ..Default::default()
            },
        )
        .await
        .map(drop);
    out.push(("DownloadPlugin", got));
    let got = conn
        .jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: id,
                version,
                stages: vec![],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .map(drop);
    out.push(("CreateJob", got));
    out
}

async fn hostile_ids(
    conn: &Conn,
    agent_token: &str,
    storage: &Path,
    tally: &mut Tally,
) -> anyhow::Result<u32> {
    let mut n = 0;
    let mut pairs: Vec<(String, String)> = bad_ids()
        .into_iter()
        .map(|id| (id, "1.0.0".to_owned()))
        .collect();
    pairs.extend(
        bad_versions()
            .into_iter()
            .map(|v| ("ok/plugin".to_owned(), v)),
    );
    for (id, version) in &pairs {
        n += 1;
        let shown: String = format!("{id:?}@{version:?}").chars().take(60).collect();
        // A job may name a selector (`latest`): valid there, and this plugin has none.
        let selector = arcade_p2p::PluginSelector::new(id, version).is_ok();
        for (rpc, got) in plugin_rpcs(conn, agent_token, id, version).await {
            let expected = if rpc == "CreateJob" && selector {
                Code::NotFound
            } else {
                Code::InvalidArgument
            };
            tally.status(&format!("{rpc} {shown}"), &[expected], got);
        }
    }
    // Content ids.
    for sha in [
        "zz".to_owned(),
        "../x".to_owned(),
        "0".repeat(63),
        "g".repeat(64),
        "\0".repeat(64),
        "0".repeat(10 * 1024),
    ] {
        n += 1;
        let shown: String = format!("{sha:?}").chars().take(40).collect();
        let got = conn
            .agent(agent_token)
            .await
            .get_manifest(pb::GetManifestRequest {
                sha256: sha.clone(),
                ..Default::default()
            })
            .await
            .map(drop);
        tally.status(
            &format!("GetManifest sha256 {shown}"),
            &[Code::InvalidArgument],
            got,
        );
        let got = conn
            .download(
                agent_token,
                pb::DownloadPluginRequest {
                    sha256: sha.clone(),
                    ..Default::default()
                },
            )
            .await
            .map(drop);
        tally.status(
            &format!("DownloadPlugin sha256 {shown}"),
            &[Code::InvalidArgument],
            got,
        );
        let got = conn
            .plugins(ADMIN)
            .await
            .push_plugin(futures::stream::iter([pb::PushPluginRequest {
                msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
                    plugin_id: "ok/sha".into(),
                    version: "1.0.0".into(),
                    expected_sha256: sha,
                    ..Default::default()
                })),
            }]))
            .await
            .map(drop);
        tally.status(
            &format!("PushPlugin expected_sha256 {shown}"),
            &[Code::InvalidArgument],
            got,
        );
    }
    // Agent registrations (moved from tests/tests/auth.rs, extended).
    for id in bad_ids()
        .into_iter()
        .chain(["bad id".into(), "x".repeat(200)])
    {
        n += 1;
        let shown: String = format!("{id:?}").chars().take(40).collect();
        let got = conn.register_with(&id, &[], vec![], false).await.map(drop);
        tally.status(
            &format!("Register agent_id {shown}"),
            &[Code::InvalidArgument],
            got,
        );
    }
    for (what, installed) in [
        ("installed sha256", ("ok/p", "1.0.0", "not-a-sha")),
        ("installed id", ("../p", "1.0.0", &*"0".repeat(64))),
        ("installed version", ("ok/p", "latest", &*"0".repeat(64))),
    ] {
        n += 1;
        let got = conn
            .register_with(
                "a2",
                &[],
                vec![pb::InstalledPlugin {
                    plugin_id: installed.0.into(),
                    version: installed.1.into(),
                    sha256: installed.2.into(),
                }],
                false,
            )
            .await
            .map(drop);
        tally.status(
            &format!("Register with a bad {what}"),
            &[Code::InvalidArgument],
            got,
        );
    }
    for (k, v) in [("bad key", "v"), ("k", "bad\0value"), ("", "v")] {
        n += 1;
        let got = conn
            .register_with("a3", &[(k, v)], vec![], false)
            .await
            .map(drop);
        tally.status(
            &format!("Register with label {k:?}={v:?}"),
            &[Code::InvalidArgument],
            got,
        );
    }
    // Nothing stored.
    let plugins = conn
        .plugins(ADMIN)
        .await
        .list_plugins(pb::ListPluginsRequest::default())
        .await?
        .into_inner()
        .plugins;
    tally.check(plugins.is_empty(), || {
        format!(
            "hostile ids stored plugins: {:?}",
            plugins.iter().map(|p| &p.plugin_id).collect::<Vec<_>>()
        )
    });
    let jobs = conn
        .jobs(ADMIN)
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    tally.check(jobs.is_empty(), || {
        format!("hostile ids created {} job(s)", jobs.len())
    });
    let files = crate::storage_files(storage);
    tally.check(files.is_empty(), || {
        format!("hostile input left files in plugin storage: {files:?}")
    });
    let agents = conn
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    tally.check(agents.len() == 1, || {
        format!(
            "hostile registrations were stored: {:?}",
            agents.iter().map(|a| &a.agent_id).collect::<Vec<_>>()
        )
    });
    Ok(n)
}

// ---------------------------------------------------------------------------------

async fn bad_input() -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n[plugin]\nchunk_size = \"64KiB\"\n[plugin.security]\nallow_unsafe = true\nrequire_checksum = false\n"
        ),
    )?;
    let data = dir.path().join("data");
    let stderr_path = dir.path().join("coordinator.stderr");
    let stderr = std::fs::File::create(&stderr_path)?;
    let mut cmd = Command::new(workspace_bin("arcade-coordinator"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .env("RUST_LOG", "warn")
        .stderr(stderr);
    let process = tokio::task::spawn_blocking(move || {
        arcade_simulations::process::CoordinatorProcess::spawn(cmd, false)
    })
    .await??;
    let conn = Conn {
        url: process.url(),
        metrics_addr: None,
        admin_token: ADMIN.into(),
        enroll_token: ENROLL.into(),
        insecure: false,
    };
    let agent_token = conn
        .register_with("prober", &[], vec![], false)
        .await
        .context("register the probing agent")?;

    let mut tally = Tally::default();
    let (frames, rpcs, codes) = malformed_frames(&conn, &agent_token, &mut tally).await?;
    let ids = hostile_ids(&conn, &agent_token, &data.join("plugins"), &mut tally).await?;
    let mut configs = validation(&mut tally, dir.path())?;
    configs += binaries(&mut tally, dir.path()).await?;
    extreme_but_accepted(&mut tally).await?;
    configs += 1;

    // The coordinator is still alive and never panicked.
    let alive = conn
        .plugins(ADMIN)
        .await
        .list_plugins(pb::ListPluginsRequest::default())
        .await;
    tally.check(alive.is_ok(), || {
        format!("the coordinator stopped answering: {alive:?}")
    });
    drop(process);
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let panics = log.matches("panicked").count();
    tally.check(panics == 0, || {
        format!(
            "the coordinator panicked {panics} time(s): {}",
            log.lines()
                .filter(|l| l.contains("panicked"))
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    });
    if !tally.failures.is_empty() {
        bail!(
            "{} of {} bad-input checks did not hold: {}",
            tally.failures.len(),
            tally.checks,
            tally.failures.join("; ")
        );
    }
    Ok(Outcome {
        outcome: format!(
            "{frames} malformed/oversized requests on {rpcs} RPCs ({codes}), {configs} bad configs, {ids} bad ids: all rejected, 0 panics ({} checks)",
            tally.checks
        ),
        ..Default::default()
    })
}
