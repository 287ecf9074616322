//! Peers without a ticket trying to crowd a real agent's mesh host.
//!
//! `mesh-outsiders`: a real agent (`mesh.max_connections = 8`, `unvouched_timeout =
//! 3 s`) holds a plugin. Twelve libp2p peers that were never enrolled connect to it and
//! ask for chunks. At most half its connection budget goes to them, so an enrolled peer
//! still connects and gets a verified chunk meanwhile; and every outsider is
//! disconnected once its time to show a ticket is up.

use std::time::Duration;

use anyhow::ensure;
use arcade_p2p::Manifest;
use arcade_proto::v1 as pb;
use arcade_simulations::client::{agent_key, signed};

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::peers::{bare_peer, bare_peer_as};
use crate::{ENROLL, TestCoordinator, content, create_job, eventually, wait_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("mesh-outsiders", || Box::pin(mesh_outsiders()))];

const OUTSIDERS: usize = 12;
const MAX_CONNECTIONS: u32 = 8;

async fn mesh_outsiders() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let mut plugin = b"#!/bin/sh\nexit 0\n".to_vec();
    plugin.extend(content(200_000, 5));
    c.push("mesh/crowded", "1.0.0", &plugin, Default::default())
        .await?;
    let mut holder = TestAgent::start(&c.url, ENROLL, "holder", |cfg, _| {
        cfg.mesh.max_connections = MAX_CONNECTIONS;
        cfg.mesh.unvouched_timeout = arcade_p2p::settings::Seconds::secs(3);
    })
    .await;
    let job = create_job(&c, "mesh/crowded", "1.0.0", "true", &[]).await;
    ensure!(
        wait_job(&c, &job).await.status() == pb::JobStatus::Succeeded,
        "setup: the holder could not run its job"
    );
    let (holder_peer, addrs) = crate::peers::mesh_address(&c, "holder").await?;
    let manifest = Manifest::from_reader(&plugin[..], 64 * 1024)?;
    let sha = arcade_p2p::ContentId::of_bytes(&plugin);

    let mut outsiders = Vec::new();
    for _ in 0..OUTSIDERS {
        let o = bare_peer().await?;
        // Refused (no ticket); the connection is what it is after.
        let _ = o
            .held(holder_peer, addrs.clone(), &sha, manifest.chunk_count())
            .await;
        outsiders.push(o);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut connected = 0;
    for o in &outsiders {
        connected += usize::from(o.is_connected(holder_peer).await);
    }
    ensure!(
        connected <= (MAX_CONNECTIONS / 2) as usize,
        "property `outsiders get at most half the connection budget` failed: {connected} of {OUTSIDERS} stay connected (budget {MAX_CONNECTIONS})"
    );

    let vouched = bare_peer_as("vouched").await?;
    let reg = c
        .agent(ENROLL)
        .await
        .register(signed(pb::RegisterRequest {
            agent_id: "vouched".into(),
            peer_id: agent_key("vouched").public().to_peer_id().to_string(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    vouched
        .set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
        .await?;
    let chunk = vouched.chunk(holder_peer, addrs.clone(), &sha, 0).await;
    ensure!(
        chunk
            .as_ref()
            .is_ok_and(|d| manifest.verify_chunk(0, d).is_ok()),
        "property `an enrolled peer is served while outsiders crowd the host` failed: {:?}",
        chunk.map(|d| d.len())
    );

    let all_gone = eventually(Duration::from_secs(8), || {
        let (outsiders, holder_peer) = (&outsiders, holder_peer);
        async move {
            for o in outsiders {
                if o.is_connected(holder_peer).await {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    ensure!(
        all_gone.is_some(),
        "property `outsiders are disconnected after mesh.unvouched_timeout` failed: still connected 8 s later"
    );
    ensure!(
        vouched.is_connected(holder_peer).await,
        "the enrolled peer was disconnected too"
    );
    holder.stop().await;
    for h in outsiders.into_iter().chain([vouched]) {
        h.shutdown().await;
    }
    Ok(Outcome {
        outcome: format!(
            "{OUTSIDERS} unticketed peers: {connected} kept connected (budget {MAX_CONNECTIONS}), all closed after unvouched_timeout; an enrolled peer got a verified chunk meanwhile"
        ),
        ..Default::default()
    })
}
