//! The authorisation matrix on the coordinator and peer paths.
//!
//! `auth-matrix`: every coordinator RPC is called with no token, a wrong token, a
//! revoked agent token (agent tokens have no expiry: re-registering an agent revokes
//! its previous token, which is what a stolen or leaked old token looks like), the
//! tokens of the other kinds (agent and enrollment tokens on admin calls, the admin
//! token on agent calls) and another agent's identity; then with the right token as a
//! control. A registered agent whose labels do not allow a plugin is refused it by the
//! coordinator (manifest and download by id and by SHA-256, listing, job assignment)
//! and by a peer holding it. On the peer path, an outsider without a ticket, a forged
//! ticket, a replayed ticket and an expired (coordinator-signed) ticket are refused as
//! not vouched for. Every cell is asserted; the outcome line gives the counts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use arcade_p2p::labels::Labels;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::host::{MeshError, MeshHandle, Multiaddr};
use arcade_p2p::mesh::ticket::{PeerId, TicketIssuer};
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use arcade_proto::v1::fleet_client::FleetClient;
use arcade_proto::v1::jobs_client::JobsClient;
use arcade_proto::v1::plugin_admin_client::PluginAdminClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::peers::{bare_peer, bare_peer_as};
use crate::{ADMIN, ENROLL, TestCoordinator, content, eventually, wait_job};
use arcade_simulations::client::signed;

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("auth-matrix", || Box::pin(auth_matrix()))];

/// Which token an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Admin,
    Enrollment,
    Agent,
}

/// Every RPC of the coordinator's services (`proto/proto/arcade/v1/*.proto`).
const RPCS: [(&str, Needs); 23] = [
    ("PluginAdmin/PushPlugin", Needs::Admin),
    ("PluginAdmin/ListPlugins", Needs::Admin),
    ("PluginAdmin/GetPlugin", Needs::Admin),
    ("PluginAdmin/SetPluginEnabled", Needs::Admin),
    ("PluginAdmin/DeletePlugin", Needs::Admin),
    ("PluginAdmin/PreheatPlugin", Needs::Admin),
    ("PluginAdmin/GetPreheat", Needs::Admin),
    ("Jobs/CreateJob", Needs::Admin),
    ("Jobs/GetJob", Needs::Admin),
    ("Jobs/ListJobs", Needs::Admin),
    ("Fleet/ListAgents", Needs::Admin),
    ("Fleet/CreateEnrollToken", Needs::Admin),
    ("Fleet/ListEnrollTokens", Needs::Admin),
    ("Agent/Register", Needs::Enrollment),
    ("Agent/Heartbeat", Needs::Agent),
    ("Agent/FetchJob", Needs::Agent),
    ("Agent/ReportJobResult", Needs::Agent),
    ("Agent/GetManifest", Needs::Agent),
    ("Agent/ListAvailablePlugins", Needs::Agent),
    ("Agent/DownloadPlugin", Needs::Agent),
    // Last: they change what the calls above name.
    ("Jobs/CancelJob", Needs::Admin),
    ("Fleet/RemoveAgent", Needs::Admin),
    ("Fleet/RevokeEnrollToken", Needs::Admin),
];

/// Adds `authorization: Bearer <token>` when there is a token (none = no metadata).
#[derive(Clone)]
struct Cred(Option<MetadataValue<Ascii>>);

impl Cred {
    fn none() -> Self {
        Self(None)
    }
    fn bearer(token: &str) -> Self {
        Self(Some(
            format!("Bearer {token}")
                .parse()
                .expect("test tokens are ASCII"),
        ))
    }
}

impl tonic::service::Interceptor for Cred {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut()
                .insert(arcade_proto::AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Cred>;

/// What the calls of the matrix name.
#[derive(Clone)]
struct Ctx {
    /// A job id for GetJob.
    job: String,
    /// A job leased to `agent_id` for ReportJobResult.
    leased: String,
    /// The agent id requests claim ("" = none).
    agent_id: String,
    /// An enrolment token id for RevokeEnrollToken.
    grant: String,
    /// A preheat id for GetPreheat.
    preheat: String,
}

/// Calls `rpc` with `cred`, with a request that succeeds when the credentials are right.
async fn call(ch: &Channel, rpc: &str, cred: Cred, ctx: &Ctx) -> Result<(), Status> {
    let svc = || -> Svc { InterceptedService::new(ch.clone(), cred.clone()) };
    let admin = || PluginAdminClient::new(svc());
    let jobs = || JobsClient::new(svc());
    let agent = || AgentClient::new(svc());
    let agent_id = ctx.agent_id.clone();
    match rpc {
        "PluginAdmin/PushPlugin" => {
            let msgs = vec![
                pb::PushPluginRequest {
                    msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
                        plugin_id: "auth/pushed".into(),
                        version: "1.0.0".into(),
                        ..Default::default()
                    })),
                },
                pb::PushPluginRequest {
                    msg: Some(pb::push_plugin_request::Msg::Data(
                        b"#!/bin/sh\nexit 0\n".to_vec(),
                    )),
                },
            ];
            admin()
                .push_plugin(futures::stream::iter(msgs))
                .await
                .map(drop)
        }
        "PluginAdmin/ListPlugins" => admin()
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .map(drop),
        "PluginAdmin/GetPlugin" => admin()
            .get_plugin(pb::GetPluginRequest {
                plugin_id: "auth/open".into(),
                version: "1.0.0".into(),
            })
            .await
            .map(drop),
        "PluginAdmin/SetPluginEnabled" => admin()
            .set_plugin_enabled(pb::SetPluginEnabledRequest {
                plugin_id: "auth/open".into(),
                version: "1.0.0".into(),
                enabled: true,
            })
            .await
            .map(drop),
        "PluginAdmin/PreheatPlugin" => admin()
            .preheat_plugin(pb::PreheatPluginRequest {
                plugin_id: "auth/open".into(),
                version: "1.0.0".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "PluginAdmin/GetPreheat" => admin()
            .get_preheat(pb::GetPreheatRequest {
                preheat_id: ctx.preheat.clone(),
            })
            .await
            .map(drop),
        "PluginAdmin/DeletePlugin" => admin()
            .delete_plugin(pb::DeletePluginRequest {
                plugin_id: "auth/pushed".into(),
                version: "1.0.0".into(),
            })
            .await
            .map(drop),
        "Jobs/CreateJob" => jobs()
            .create_job(pb::CreateJobRequest {
                commands: vec!["true".into()],
                label_selector: vec![pb::Label {
                    key: "nobody".into(),
                    value: "matches".into(),
                }],
                ..Default::default()
            })
            .await
            .map(drop),
        "Jobs/GetJob" => jobs()
            .get_job(pb::GetJobRequest {
                job_id: ctx.job.clone(),
            })
            .await
            .map(drop),
        "Jobs/ListJobs" => jobs()
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .map(drop),
        "Jobs/CancelJob" => jobs()
            .cancel_job(pb::CancelJobRequest {
                job_id: ctx.job.clone(),
            })
            .await
            .map(drop),
        "Fleet/RemoveAgent" => FleetClient::new(svc())
            .remove_agent(pb::RemoveAgentRequest {
                agent_id: "removable".into(),
            })
            .await
            .map(drop),
        "Fleet/ListAgents" => FleetClient::new(svc())
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map(drop),
        "Fleet/CreateEnrollToken" => FleetClient::new(svc())
            .create_enroll_token(pb::CreateEnrollTokenRequest::default())
            .await
            .map(drop),
        "Fleet/ListEnrollTokens" => FleetClient::new(svc())
            .list_enroll_tokens(pb::ListEnrollTokensRequest {})
            .await
            .map(drop),
        "Fleet/RevokeEnrollToken" => FleetClient::new(svc())
            .revoke_enroll_token(pb::RevokeEnrollTokenRequest {
                id: ctx.grant.clone(),
            })
            .await
            .map(drop),
        "Agent/Register" => agent()
            .register(signed(pb::RegisterRequest {
                agent_id: "auth-probe".into(),
                ..Default::default()
            }))
            .await
            .map(drop),
        "Agent/Heartbeat" => agent()
            .heartbeat(pb::HeartbeatRequest {
                agent_id,
                running_jobs: vec![ctx.leased.clone()],
                ..Default::default()
            })
            .await
            .map(drop),
        "Agent/FetchJob" => agent()
            .fetch_job(pb::FetchJobRequest {
                agent_id,
                max_jobs: 1,
                wait_seconds: 0,
            })
            .await
            .and_then(|r| {
                // The right token may lease nothing here: the only job this agent may
                // run is already leased to it.
                if r.into_inner().jobs.is_empty() {
                    Ok(())
                } else {
                    Err(Status::internal("FetchJob leased an unexpected job"))
                }
            }),
        "Agent/ReportJobResult" => agent()
            .report_job_result(pb::ReportJobResultRequest {
                agent_id,
                job_id: ctx.leased.clone(),
                status: pb::JobStatus::Succeeded as i32,
                ..Default::default()
            })
            .await
            .map(drop),
        "Agent/GetManifest" => agent()
            .get_manifest(pb::GetManifestRequest {
                agent_id,
                plugin_id: "auth/open".into(),
                version: "1.0.0".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Agent/ListAvailablePlugins" => agent()
            .list_available_plugins(pb::ListAvailablePluginsRequest {
                agent_id,
                ..Default::default()
            })
            .await
            .map(drop),
        "Agent/DownloadPlugin" => {
            let mut stream = agent()
                .max_decoding_message_size(arcade_proto::MAX_MESSAGE)
                .download_plugin(pb::DownloadPluginRequest {
                    agent_id,
                    plugin_id: "auth/open".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        other => Err(Status::unimplemented(format!(
            "no such RPC in the matrix: {other}"
        ))),
    }
}

/// The cells: what was expected and what came back, grouped for the outcome line.
#[derive(Default)]
struct Matrix {
    /// Group → (held, total).
    groups: BTreeMap<&'static str, (u32, u32)>,
    failures: Vec<String>,
    /// RPC → one mark per credential column, for the printed table.
    table: BTreeMap<String, Vec<String>>,
}

fn code_name(code: Code) -> String {
    match code {
        Code::Unauthenticated => "UNAUTH".into(),
        Code::PermissionDenied => "DENIED".into(),
        other => format!("{other:?}"),
    }
}

impl Matrix {
    fn cell(&mut self, group: &'static str, what: &str, held: bool, detail: String) {
        let g = self.groups.entry(group).or_default();
        g.1 += 1;
        if held {
            g.0 += 1;
        } else {
            self.failures.push(format!("{what}: {detail}"));
        }
    }

    /// A call expected to fail with `expected` (and a message that says something).
    fn denied(&mut self, group: &'static str, what: &str, expected: Code, got: Result<(), Status>) {
        let (held, detail, mark) = match got {
            Ok(()) => (
                false,
                format!("expected {expected:?}, the call succeeded"),
                "OK!".into(),
            ),
            Err(s) => (
                s.code() == expected && !s.message().is_empty(),
                format!("expected {expected:?}, got {:?}: {}", s.code(), s.message()),
                code_name(s.code()),
            ),
        };
        self.mark(what, mark);
        self.cell(group, what, held, detail);
    }

    /// A call expected to succeed.
    fn allowed(&mut self, group: &'static str, what: &str, got: Result<(), Status>) {
        let (held, detail, mark) = match got {
            Ok(()) => (true, String::new(), "ok".to_string()),
            Err(s) => (
                false,
                format!("expected success, got {:?}: {}", s.code(), s.message()),
                code_name(s.code()),
            ),
        };
        self.mark(what, mark);
        self.cell(group, what, held, detail);
    }

    fn mark(&mut self, what: &str, mark: String) {
        if let Some((rpc, cred)) = what.split_once(' ').filter(|(r, _)| r.contains('/')) {
            self.table
                .entry(rpc.to_owned())
                .or_default()
                .push(format!("{cred}={mark}"));
        }
    }

    /// A peer request expected to be refused with `expected`.
    fn refused<T>(
        &mut self,
        group: &'static str,
        what: &str,
        expected: pb::Refusal,
        got: Result<T, MeshError>,
    ) {
        let (held, detail) = match got {
            Err(MeshError::Refused { reason, message }) => (
                reason == expected,
                format!("expected {expected:?}, refused {reason:?}: {message}"),
            ),
            Err(e) => (false, format!("expected a {expected:?} refusal, got {e}")),
            Ok(_) => (false, format!("expected {expected:?}, the peer served it")),
        };
        self.cell(group, what, held, detail);
    }

    fn count(&self, group: &str) -> String {
        let (held, total) = self.groups.get(group).copied().unwrap_or_default();
        format!("{held}/{total}")
    }
}

/// Registers `id` with `labels` (granted by an admin-made enrolment token when there
/// are any) and `peer`'s id when given (a peer started with `bare_peer_as(id)`);
/// returns its token and, with a peer, its mesh ticket and the coordinator key.
async fn register(
    c: &TestCoordinator,
    id: &str,
    labels: &[(&str, &str)],
    peer: Option<&MeshHandle>,
) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
    let token = if labels.is_empty() {
        ENROLL.to_owned()
    } else {
        c.grant(labels).await?
    };
    let r = c
        .agent(&token)
        .await
        .register(signed(pb::RegisterRequest {
            agent_id: id.into(),
            peer_id: peer.map(|p| p.peer_id().to_string()).unwrap_or_default(),
            labels: labels
                .iter()
                .map(|(k, v)| pb::Label {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..Default::default()
        }))
        .await
        .with_context(|| format!("register {id}"))?
        .into_inner();
    Ok((r.agent_token, r.mesh_ticket, r.mesh_public_key))
}

fn plugin_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut p = b"#!/bin/sh\nexit 0\n".to_vec();
    p.extend(content(len, seed));
    p
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn job_with(
    c: &TestCoordinator,
    plugin: Option<&str>,
    selector: (&str, &str),
) -> anyhow::Result<String> {
    Ok(c.jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            label_selector: vec![pb::Label {
                key: selector.0.into(),
                value: selector.1.into(),
            }],
            required_plugins: plugin
                .map(|p| pb::RequiredPlugin {
                    plugin_id: p.into(),
                    version: "1.0.0".into(),
                    stages: vec![],
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await
        .context("create job")?
        .into_inner()
        .job_id)
}

async fn job_status(c: &TestCoordinator, id: &str) -> anyhow::Result<pb::JobStatus> {
    Ok(c.jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await?
        .into_inner()
        .job
        .context("GetJob returned no job")?
        .status())
}

async fn auth_matrix() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let open = plugin_bytes(200_000, 1);
    let secret = plugin_bytes(100_000, 2);
    c.push("auth/open", "1.0.0", &open, Default::default())
        .await
        .context("push auth/open")?;
    c.push(
        "auth/secret",
        "1.0.0",
        &secret,
        pb::PushPluginHeader {
            allowed_labels: vec![pb::Label {
                key: "team".into(),
                value: "red".into(),
            }],
            ..Default::default()
        },
    )
    .await
    .context("push auth/secret")?;
    let (open_sha, secret_sha) = (ContentId::of_bytes(&open), ContentId::of_bytes(&secret));

    // A real agent of team red holds both plugins (it ran a job with each).
    let red_token = c.grant(&[("team", "red")]).await?;
    let mut holder = TestAgent::start(&c.url, &red_token, "holder", |cfg, _| {
        cfg.labels.insert("team".into(), "red".into());
    })
    .await;
    for p in ["auth/open", "auth/secret"] {
        let id = job_with(&c, Some(p), ("team", "red")).await?;
        let job = wait_job(&c, &id).await;
        ensure!(
            job.status() == pb::JobStatus::Succeeded,
            "setup: the team-red holder could not run {p}: {}",
            job.error_message
        );
    }

    // Callers: a team-blue agent (with a libp2p peer), a revoked token.
    let blue_peer = bare_peer_as("blue").await?;
    let (blue, blue_ticket, coordinator_key) =
        register(&c, "blue", &[("team", "blue")], Some(&blue_peer)).await?;
    blue_peer
        .set_credentials(blue_ticket.clone(), &coordinator_key)
        .await?;
    let (revoked, _, _) = register(&c, "gone", &[], None).await?;
    let (current, _, _) = register(&c, "gone", &[], None).await?;
    ensure!(revoked != current, "re-registering must issue a new token");
    // The agent the right-token RemoveAgent call removes.
    register(&c, "removable", &[], None).await?;

    // Jobs the calls name: one to read, one leased to blue to report on.
    let readable = job_with(&c, None, ("nobody", "matches")).await?;
    let leased = job_with(&c, None, ("team", "blue")).await?;
    let got = c
        .agent(&blue)
        .await
        .fetch_job(pb::FetchJobRequest {
            agent_id: "blue".into(),
            max_jobs: 1,
            wait_seconds: 5,
        })
        .await?
        .into_inner()
        .jobs;
    ensure!(
        got.iter().any(|j| j.job_id == leased),
        "setup: blue did not lease its job (got {:?})",
        got.iter().map(|j| &j.job_id).collect::<Vec<_>>()
    );
    let grant = c
        .fleet(ADMIN)
        .await
        .create_enroll_token(pb::CreateEnrollTokenRequest::default())
        .await?
        .into_inner()
        .info
        .context("setup: CreateEnrollToken answered no info")?
        .id;
    // Its labels differ from the matrix's PreheatPlugin call, which would replace it.
    let preheat = c
        .plugins(ADMIN)
        .await
        .preheat_plugin(pb::PreheatPluginRequest {
            plugin_id: "auth/open".into(),
            version: "1.0.0".into(),
            labels: vec![pb::Label {
                key: "zone".into(),
                value: "setup".into(),
            }],
            ..Default::default()
        })
        .await?
        .into_inner()
        .preheat
        .context("setup: PreheatPlugin answered no preheat")?
        .preheat_id;
    let ctx = Ctx {
        job: readable,
        leased: leased.clone(),
        agent_id: String::new(),
        grant,
        preheat,
    };

    // Coordinator: every RPC × every credential.
    let ch = c.channel().await;
    let mut m = Matrix::default();
    const BAD: &str = "unauthenticated (no/wrong/revoked token)";
    const OTHER_KIND: &str = "permission denied (agent/enrollment token on admin calls)";
    const OTHER_ON_AGENT: &str =
        "unauthenticated (admin/agent token on Register, admin/enrollment token on agent calls)";
    const IMPERSONATION: &str = "permission denied (agent token, another agent's id)";
    const RIGHT: &str = "right token";
    for (rpc, needs) in RPCS {
        for (label, cred) in [
            ("none", Cred::none()),
            ("wrong", Cred::bearer("not-a-real-token-0000")),
            ("revoked", Cred::bearer(&revoked)),
        ] {
            let got = call(&ch, rpc, cred, &ctx).await;
            if label == "none" {
                if let Err(s) = &got {
                    ensure!(
                        s.message().contains("authorization"),
                        "{rpc} without a token must say which metadata is missing: {s:?}"
                    );
                }
            }
            m.denied(BAD, &format!("{rpc} {label}"), Code::Unauthenticated, got);
        }
        match needs {
            Needs::Admin => {
                for (label, token) in [("agent", blue.as_str()), ("enroll", ENROLL)] {
                    let got = call(&ch, rpc, Cred::bearer(token), &ctx).await;
                    m.denied(
                        OTHER_KIND,
                        &format!("{rpc} {label}"),
                        Code::PermissionDenied,
                        got,
                    );
                }
            }
            Needs::Enrollment => {
                for (label, token) in [("agent", blue.as_str()), ("admin", ADMIN)] {
                    let got = call(&ch, rpc, Cred::bearer(token), &ctx).await;
                    m.denied(
                        OTHER_ON_AGENT,
                        &format!("{rpc} {label}"),
                        Code::Unauthenticated,
                        got,
                    );
                }
            }
            Needs::Agent => {
                for (label, token) in [("admin", ADMIN), ("enroll", ENROLL)] {
                    let got = call(&ch, rpc, Cred::bearer(token), &ctx).await;
                    m.denied(
                        OTHER_ON_AGENT,
                        &format!("{rpc} {label}"),
                        Code::Unauthenticated,
                        got,
                    );
                }
                let other = Ctx {
                    agent_id: "holder".into(),
                    ..ctx.clone()
                };
                let got = call(&ch, rpc, Cred::bearer(&blue), &other).await;
                m.denied(
                    IMPERSONATION,
                    &format!("{rpc} as-holder"),
                    Code::PermissionDenied,
                    got,
                );
            }
        }
        let right = match needs {
            Needs::Admin => ADMIN,
            Needs::Enrollment => ENROLL,
            Needs::Agent => blue.as_str(),
        };
        let got = call(&ch, rpc, Cred::bearer(right), &ctx).await;
        m.allowed(RIGHT, &format!("{rpc} right"), got);
    }
    // The health service is public: no token needed.
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "arcade.v1.Agent".into(),
        })
        .await
        .map(|r| r.into_inner().status);
    m.cell(
        RIGHT,
        "grpc.health.v1.Health/Check none",
        health.as_ref().is_ok_and(|s| {
            *s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }),
        format!("expected SERVING without a token, got {health:?}"),
    );
    // Re-registration revoked the old token (above) and the new one works.
    let fresh = c
        .agent(&current)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .map(drop);
    m.allowed(RIGHT, "Agent/Heartbeat fresh-token", fresh);
    ensure!(
        job_status(&c, &leased).await? == pb::JobStatus::Succeeded,
        "only the right token's ReportJobResult may finish the leased job"
    );

    // Coordinator: a registered agent whose labels do not allow the plugin.
    const ACL: &str = "label ACL (coordinator)";
    let blue_agent = || c.agent(&blue);
    let by_id = |p: &str| pb::GetManifestRequest {
        plugin_id: p.into(),
        version: "1.0.0".into(),
        ..Default::default()
    };
    let got = blue_agent()
        .await
        .get_manifest(by_id("auth/secret"))
        .await
        .map(drop);
    m.denied(ACL, "GetManifest secret by id", Code::PermissionDenied, got);
    let got = blue_agent()
        .await
        .get_manifest(pb::GetManifestRequest {
            sha256: secret_sha.to_hex(),
            ..Default::default()
        })
        .await
        .map(drop);
    m.denied(
        ACL,
        "GetManifest secret by sha256",
        Code::PermissionDenied,
        got,
    );
    let got = c
        .download(
            &blue,
            pb::DownloadPluginRequest {
                plugin_id: "auth/secret".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .map(drop);
    m.denied(
        ACL,
        "DownloadPlugin secret by id",
        Code::PermissionDenied,
        got,
    );
    let got = c
        .download(
            &blue,
            pb::DownloadPluginRequest {
                sha256: secret_sha.to_hex(),
                ..Default::default()
            },
        )
        .await
        .map(drop);
    m.denied(
        ACL,
        "DownloadPlugin secret by sha256",
        Code::PermissionDenied,
        got,
    );
    let listed = blue_agent()
        .await
        .list_available_plugins(pb::ListAvailablePluginsRequest::default())
        .await?
        .into_inner()
        .plugins;
    m.cell(
        ACL,
        "ListAvailablePlugins hides secret",
        !listed.iter().any(|p| p.plugin_id == "auth/secret")
            && listed.iter().any(|p| p.plugin_id == "auth/open"),
        format!(
            "blue must see auth/open and not auth/secret, saw {:?}",
            listed.iter().map(|p| &p.plugin_id).collect::<Vec<_>>()
        ),
    );
    // Job assignment: a job for team blue needing the red plugin is never leased to blue.
    let forbidden_job = job_with(&c, Some("auth/secret"), ("team", "blue")).await?;
    let got = blue_agent()
        .await
        .fetch_job(pb::FetchJobRequest {
            agent_id: "blue".into(),
            max_jobs: 4,
            wait_seconds: 2,
        })
        .await?
        .into_inner()
        .jobs;
    let status = job_status(&c, &forbidden_job).await?;
    m.cell(
        ACL,
        "FetchJob never assigns secret to blue",
        got.is_empty() && status == pb::JobStatus::Queued,
        format!(
            "blue got {} job(s); the job needing auth/secret is {status:?}",
            got.len()
        ),
    );

    // Peer path: the team-red holder serves only vouched peers, only what labels allow.
    let holder_summary = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == "holder")
        .context("the holder is registered")?;
    let holder_peer: PeerId = holder_summary
        .peer_id
        .parse()
        .context("the holder registered a libp2p peer id")?;
    let addrs: Vec<Multiaddr> = holder_summary
        .addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    ensure!(!addrs.is_empty(), "the holder advertised no address");
    let open_manifest = Manifest::from_reader(&open[..], 64 * 1024)?;
    let secret_manifest = Manifest::from_reader(&secret[..], 64 * 1024)?;
    // The holder has learned both contents' labels (it ran their jobs).
    let ready = eventually(Duration::from_secs(10), || async {
        blue_peer
            .held(
                holder_peer,
                addrs.clone(),
                &open_sha,
                open_manifest.chunk_count(),
            )
            .await
            .ok()
            .filter(Bitfield::is_full)
    })
    .await;
    ensure!(
        ready.is_some(),
        "the holder never offered auth/open to a vouched peer"
    );

    const NOT_VOUCHED: &str = "peer: not vouched (no/forged/replayed/expired ticket)";
    const FORBIDDEN: &str = "peer: forbidden (wrong labels)";
    const PEER_OK: &str = "peer: vouched, labels allow";
    let probe = |peer: &MeshHandle, sha: ContentId, chunks: u32| {
        let (peer, addrs) = (peer.clone(), addrs.clone());
        async move {
            let held = peer.held(holder_peer, addrs.clone(), &sha, chunks).await;
            let chunk = peer.chunk(holder_peer, addrs, &sha, 0).await;
            (held, chunk)
        }
    };
    let outsider = bare_peer().await?;
    let forged = bare_peer().await?;
    let other_key = TicketIssuer::generate();
    let red_labels: Labels = [("team".to_string(), "red".to_string())].into();
    let forged_ticket = other_key.issue(
        &forged.peer_id(),
        "forged",
        &red_labels,
        now_ms(),
        3_600_000,
    )?;
    forged
        .set_credentials(forged_ticket, &coordinator_key)
        .await?;
    let replayer = bare_peer().await?;
    replayer
        .set_credentials(blue_ticket.clone(), &coordinator_key)
        .await?;
    let late = bare_peer().await?;
    let key = std::fs::read(c.config.data_dir.join("mesh.key")).context("coordinator mesh key")?;
    let coordinator_issuer = TicketIssuer::from_bytes(&key)?;
    let expired = coordinator_issuer.issue(
        &late.peer_id(),
        "late",
        &red_labels,
        now_ms() - 7_200_000,
        3_600_000,
    )?;
    late.set_credentials(expired, &coordinator_key).await?;
    for (who, peer) in [
        ("outsider", &outsider),
        ("forged", &forged),
        ("replayed", &replayer),
        ("expired", &late),
    ] {
        for (name, sha, chunks) in [
            ("open", open_sha, open_manifest.chunk_count()),
            ("secret", secret_sha, secret_manifest.chunk_count()),
        ] {
            let (held, chunk) = probe(peer, sha, chunks).await;
            m.refused(
                NOT_VOUCHED,
                &format!("{who} held {name}"),
                pb::Refusal::NotVouched,
                held,
            );
            m.refused(
                NOT_VOUCHED,
                &format!("{who} chunk {name}"),
                pb::Refusal::NotVouched,
                chunk,
            );
        }
    }
    let (held, chunk) = probe(&blue_peer, secret_sha, secret_manifest.chunk_count()).await;
    m.refused(FORBIDDEN, "blue held secret", pb::Refusal::Forbidden, held);
    m.refused(
        FORBIDDEN,
        "blue chunk secret",
        pb::Refusal::Forbidden,
        chunk,
    );
    // Controls: the same peer gets what its labels allow; a red peer gets the secret.
    let (_, chunk) = probe(&blue_peer, open_sha, open_manifest.chunk_count()).await;
    m.cell(
        PEER_OK,
        "blue chunk open",
        chunk
            .as_ref()
            .is_ok_and(|d| open_manifest.verify_chunk(0, d).is_ok()),
        format!(
            "expected a verified chunk, got {:?}",
            chunk.map(|d| d.len())
        ),
    );
    let red_peer = bare_peer_as("red-peer").await?;
    let (_, red_ticket, _) = register(&c, "red-peer", &[("team", "red")], Some(&red_peer)).await?;
    red_peer
        .set_credentials(red_ticket, &coordinator_key)
        .await?;
    let (_, chunk) = probe(&red_peer, secret_sha, secret_manifest.chunk_count()).await;
    m.cell(
        PEER_OK,
        "red chunk secret",
        chunk
            .as_ref()
            .is_ok_and(|d| secret_manifest.verify_chunk(0, d).is_ok()),
        format!(
            "expected a verified chunk, got {:?}",
            chunk.map(|d| d.len())
        ),
    );

    for p in [&blue_peer, &outsider, &forged, &replayer, &late, &red_peer] {
        p.shutdown().await;
    }
    holder.stop().await;

    eprintln!("auth-matrix (coordinator RPC × credential):");
    for (rpc, marks) in &m.table {
        eprintln!("  {rpc:<40} {}", marks.join(" "));
    }
    if !m.failures.is_empty() {
        bail!(
            "{} of the authorisation matrix's cells did not hold: {}",
            m.failures.len(),
            m.failures.join("; ")
        );
    }
    let total: u32 = m.groups.values().map(|g| g.1).sum();
    Ok(Outcome {
        outcome: format!(
            "{total} cells held — coordinator, {} RPCs: {} UNAUTHENTICATED for no/wrong/revoked token (agent tokens do not expire: a re-registration revokes the old one), {} PERMISSION_DENIED for agent/enrollment tokens on admin calls, {} UNAUTHENTICATED for tokens of another kind on agent calls, {} PERMISSION_DENIED for another agent's id, {} right-token calls (and the public health check) ok; wrong-label agent: {} refused by the coordinator, {} FORBIDDEN by the peer; {} NOT_VOUCHED peer requests (outsider, forged, replayed, expired ticket); {} vouched peer fetches ok",
            RPCS.len(),
            m.count(BAD),
            m.count(OTHER_KIND),
            m.count(OTHER_ON_AGENT),
            m.count(IMPERSONATION),
            m.count(RIGHT),
            m.count(ACL),
            m.count(FORBIDDEN),
            m.count(NOT_VOUCHED),
            m.count(PEER_OK),
        ),
        ..Default::default()
    })
}
