//! Attacks on agent identity: taking over a registered agent id, giving oneself labels
//! that guard content, and a removed agent staying in the mesh.
//!
//! - `agent-takeover`: with the fleet-wide enrolment token, an attacker registers the id
//!   of a registered agent under its own key, replays the agent's recorded `Register`,
//!   and sends one without a proof. All are refused; the agent's token keeps working; a
//!   new key gets the id only after an admin removes the old agent.
//! - `self-granted-labels`: a plugin is restricted to `team=red`. Declaring `team=red`
//!   with the fleet token, or with a token granting `team=blue`, is refused; a token
//!   granting `team=red` gives the label (declared or not) within its id pattern, use
//!   count and lifetime, and stops working when revoked.
//! - `revoked-peer`: an enrolled peer gets chunks from a real agent; an admin removes it;
//!   within seconds the agent refuses it although its ticket is valid for an hour.

use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use arcade_p2p::{Manifest, now_ms};
use arcade_proto::v1 as pb;
use arcade_simulations::client::{agent_key, signed};
use tonic::Code;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::peers::bare_peer_as;
use crate::{ADMIN, ENROLL, TestCoordinator, content, create_job, eventually, wait_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("agent-takeover", || Box::pin(agent_takeover())),
    ("self-granted-labels", || Box::pin(self_granted_labels())),
    ("revoked-peer", || Box::pin(revoked_peer())),
];

fn label(k: &str, v: &str) -> pb::Label {
    pb::Label {
        key: k.into(),
        value: v.into(),
    }
}

/// `Register` of `id` declaring `labels`, signed by `id`'s simulated key.
fn request(id: &str, labels: &[(&str, &str)]) -> pb::RegisterRequest {
    signed(pb::RegisterRequest {
        agent_id: id.into(),
        labels: labels.iter().map(|(k, v)| label(k, v)).collect(),
        ..Default::default()
    })
}

async fn register(
    c: &TestCoordinator,
    token: &str,
    req: pb::RegisterRequest,
) -> Result<pb::RegisterResponse, tonic::Status> {
    c.agent(token)
        .await
        .register(req)
        .await
        .map(|r| r.into_inner())
}

fn refused<T: std::fmt::Debug>(
    what: &str,
    got: Result<T, tonic::Status>,
    code: Code,
    says: &str,
) -> anyhow::Result<()> {
    match got {
        Err(s) if s.code() == code && s.message().contains(says) => Ok(()),
        other => Err(anyhow!(
            "property `{what}` failed: expected {code:?} saying {says:?}, got {other:?}"
        )),
    }
}

async fn agent_takeover() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let recorded = request("victim", &[]);
    let victim = register(&c, ENROLL, recorded.clone()).await?.agent_token;

    // Another key claims the id.
    let mut forged = pb::RegisterRequest {
        agent_id: "victim".into(),
        ..Default::default()
    };
    arcade_p2p::identity::sign_register(
        &mut forged,
        &libp2p_identity::Keypair::generate_ed25519(),
        now_ms(),
    );
    refused(
        "another key cannot take a bound id",
        register(&c, ENROLL, forged.clone()).await,
        Code::PermissionDenied,
        "arcadectl agent remove victim",
    )?;
    // The victim's own request, recorded and sent again.
    refused(
        "a recorded Register cannot be replayed",
        register(&c, ENROLL, recorded).await,
        Code::PermissionDenied,
        "not after the last accepted",
    )?;
    // No proof at all.
    refused(
        "a Register without a proof is refused",
        register(
            &c,
            ENROLL,
            pb::RegisterRequest {
                agent_id: "victim".into(),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "identity proof",
    )?;
    // A proof made for another id does not carry over.
    let mut moved = request("someone-else", &[]);
    moved.agent_id = "victim".into();
    refused(
        "a proof is bound to its agent id",
        register(&c, ENROLL, moved).await,
        Code::Unauthenticated,
        "signature",
    )?;
    c.agent(&victim)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .context("property `the victim keeps its token` failed")?;
    // The owner itself re-registers (a fresh proof) as often as it likes.
    register(&c, ENROLL, request("victim", &[]))
        .await
        .context("property `the key's owner re-registers` failed")?;
    // After an admin removes the agent, a new machine (key) may take the id.
    c.fleet(ADMIN)
        .await
        .remove_agent(pb::RemoveAgentRequest {
            agent_id: "victim".into(),
        })
        .await?;
    arcade_p2p::identity::sign_register(
        &mut forged,
        &libp2p_identity::Keypair::generate_ed25519(),
        now_ms(),
    );
    register(&c, ENROLL, forged)
        .await
        .context("property `a removed id can be enrolled by a new key` failed")?;
    Ok(Outcome {
        outcome: "takeover, replay, no proof and a moved proof refused; victim kept its token"
            .into(),
        ..Default::default()
    })
}

async fn create_grant(
    c: &TestCoordinator,
    labels: &[(&str, &str)],
    id_pattern: &str,
    max_uses: u32,
) -> anyhow::Result<(String, String)> {
    let r = c
        .fleet(ADMIN)
        .await
        .create_enroll_token(pb::CreateEnrollTokenRequest {
            labels: labels.iter().map(|(k, v)| label(k, v)).collect(),
            id_pattern: id_pattern.into(),
            max_uses,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((r.token, r.info.context("token info")?.id))
}

async fn labels_of(c: &TestCoordinator, id: &str) -> anyhow::Result<Vec<(String, String)>> {
    let agent = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == id)
        .with_context(|| format!("{id} is registered"))?;
    Ok(agent.labels.into_iter().map(|l| (l.key, l.value)).collect())
}

async fn self_granted_labels() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|c| {
        c.agents.restricted_label_keys = vec!["env".into()];
    })
    .await;
    c.push(
        "team/secret",
        "1.0.0",
        b"#!/bin/sh\nexit 0\n",
        pb::PushPluginHeader {
            allowed_labels: vec![label("team", "red")],
            ..Default::default()
        },
    )
    .await?;
    refused(
        "the fleet token grants no restricted label (plugin ACL key)",
        register(&c, ENROLL, request("mallory", &[("team", "red")])).await,
        Code::PermissionDenied,
        "team=red is restricted",
    )?;
    refused(
        "the fleet token grants no restricted label (agents.restricted_label_keys)",
        register(&c, ENROLL, request("mallory", &[("env", "prod")])).await,
        Code::PermissionDenied,
        "env=prod is restricted",
    )?;
    let (blue, _) = create_grant(&c, &[("team", "blue")], "", 0).await?;
    refused(
        "a token grants only its own labels",
        register(&c, &blue, request("mallory", &[("team", "red")])).await,
        Code::PermissionDenied,
        "team=red is restricted",
    )?;
    // Unrestricted labels stay the agent's own.
    register(&c, ENROLL, request("plain", &[("os", "linux")]))
        .await
        .context("property `unrestricted labels are accepted` failed")?;

    let (red, red_id) = create_grant(&c, &[("team", "red")], "red-*", 1).await?;
    refused(
        "a token enrols only ids matching its pattern",
        register(&c, &red, request("blue-1", &[])).await,
        Code::PermissionDenied,
        "matching",
    )?;
    let r = register(&c, &red, request("red-1", &[]))
        .await
        .context("property `a granting token enrols` failed")?;
    ensure!(
        labels_of(&c, "red-1")
            .await?
            .contains(&("team".into(), "red".into())),
        "property `granted labels are given by the coordinator` failed"
    );
    c.agent(&r.agent_token)
        .await
        .get_manifest(pb::GetManifestRequest {
            plugin_id: "team/secret".into(),
            version: "1.0.0".into(),
            ..Default::default()
        })
        .await
        .context("property `a granted label opens the plugin` failed")?;
    refused(
        "a token's use count holds",
        register(&c, &red, request("red-2", &[])).await,
        Code::PermissionDenied,
        "used up",
    )?;
    // Re-registering the same agent (same key) is not a new use, and keeps the grant.
    register(&c, ENROLL, request("red-1", &[("team", "red")]))
        .await
        .context("property `a granted agent re-registers with its labels` failed")?;
    c.fleet(ADMIN)
        .await
        .revoke_enroll_token(pb::RevokeEnrollTokenRequest { id: red_id })
        .await?;
    refused(
        "a revoked token enrols no one",
        register(&c, &red, request("red-1", &[])).await,
        Code::Unauthenticated,
        "invalid enrollment token",
    )?;
    Ok(Outcome {
        outcome: "self-declared, foreign, out-of-pattern, used-up and revoked grants refused"
            .into(),
        ..Default::default()
    })
}

async fn revoked_peer() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|c| {
        c.jobs.heartbeat_interval = arcade_p2p::settings::Seconds(Duration::from_millis(300));
    })
    .await;
    let data = content(200_000, 9);
    let mut plugin = b"#!/bin/sh\nexit 0\n".to_vec();
    plugin.extend(&data);
    c.push("mesh/open", "1.0.0", &plugin, Default::default())
        .await?;
    let mut holder = TestAgent::start(&c.url, ENROLL, "holder", |_, _| {}).await;
    let job = create_job(&c, "mesh/open", "1.0.0", "true", &[]).await;
    ensure!(
        wait_job(&c, &job).await.status() == pb::JobStatus::Succeeded,
        "setup: the holder could not run its job"
    );
    let (holder_peer, addrs) = crate::peers::mesh_address(&c, "holder").await?;
    let manifest = Manifest::from_reader(&plugin[..], 64 * 1024)?;
    let sha = arcade_p2p::ContentId::of_bytes(&plugin);

    let evil = bare_peer_as("evil").await?;
    let reg = register(
        &c,
        ENROLL,
        signed(pb::RegisterRequest {
            agent_id: "evil".into(),
            peer_id: agent_key("evil").public().to_peer_id().to_string(),
            ..Default::default()
        }),
    )
    .await?;
    evil.set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
        .await?;
    let chunk = evil.chunk(holder_peer, addrs.clone(), &sha, 0).await;
    ensure!(
        chunk
            .as_ref()
            .is_ok_and(|d| manifest.verify_chunk(0, d).is_ok()),
        "setup: the enrolled peer was not served ({:?})",
        chunk.map(|d| d.len())
    );
    c.fleet(ADMIN)
        .await
        .remove_agent(pb::RemoveAgentRequest {
            agent_id: "evil".into(),
        })
        .await?;
    let removed_at = std::time::Instant::now();
    let refused_after = eventually(Duration::from_secs(10), || {
        let (evil, addrs, sha) = (evil.clone(), addrs.clone(), sha);
        async move {
            match evil.chunk(holder_peer, addrs, &sha, 0).await {
                Ok(_) => None,
                Err(_) => Some(removed_at.elapsed()),
            }
        }
    })
    .await
    .ok_or_else(|| {
        anyhow!(
            "property `a removed agent is refused by its peers within seconds` failed: still served 10 s after removal (its ticket is valid for 1 h)"
        )
    })?;
    holder.stop().await;
    evil.shutdown().await;
    Ok(Outcome {
        outcome: format!(
            "removed peer refused {:.1} s after removal (ticket valid 1 h)",
            refused_after.as_secs_f64()
        ),
        ..Default::default()
    })
}
