//! Bare libp2p peers for the end-to-end tests: a real mesh host that holds nothing and
//! only asks (outsiders, thieves, label-restricted requesters). It runs the DHT
//! (`HostConfig::dht`), so it can look up providers where agents run it too.

use std::sync::Arc;

use anyhow::Context as _;
use arcade_p2p::ContentId;
use arcade_p2p::labels::Labels;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::host::{ChunkStore, HostConfig, MeshHandle, MeshHost};

/// A store that holds nothing.
struct Nothing;

impl ChunkStore for Nothing {
    fn allowed_labels(&self, _: &ContentId) -> Option<Labels> {
        None
    }
    fn held(&self, _: &ContentId) -> Option<Bitfield> {
        None
    }
    fn read_chunk(&self, _: &ContentId, _: u32) -> std::io::Result<Option<bytes::Bytes>> {
        Ok(None)
    }
}

/// Starts a mesh host on loopback with a fresh identity that serves nothing.
pub async fn bare_peer() -> anyhow::Result<MeshHandle> {
    start(libp2p_identity::Keypair::generate_ed25519()).await
}

/// A bare peer whose identity is the simulated agent key of `agent_id`
/// (`arcade_simulations::client::agent_key`), so it can enrol as that agent.
pub async fn bare_peer_as(agent_id: &str) -> anyhow::Result<MeshHandle> {
    start(arcade_simulations::client::agent_key(agent_id)).await
}

async fn start(key: libp2p_identity::Keypair) -> anyhow::Result<MeshHandle> {
    let config = HostConfig {
        dht: true,
        ..HostConfig::default()
    };
    MeshHost::start(key, config, Arc::new(Nothing))
        .await
        .context("start a bare libp2p peer")
}

/// The libp2p peer id and advertised addresses of agent `agent_id`, as the coordinator
/// lists them (what a fetcher is told).
pub async fn mesh_address(
    c: &crate::Conn,
    agent_id: &str,
) -> anyhow::Result<(
    libp2p_identity::PeerId,
    Vec<arcade_p2p::mesh::host::Multiaddr>,
)> {
    let agent = c
        .fleet(crate::ADMIN)
        .await
        .list_agents(arcade_proto::v1::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == agent_id)
        .with_context(|| format!("{agent_id} is registered"))?;
    let peer = agent
        .peer_id
        .parse()
        .with_context(|| format!("{agent_id} registered no libp2p peer id"))?;
    let addrs: Vec<_> = agent.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    anyhow::ensure!(!addrs.is_empty(), "{agent_id} advertised no address");
    Ok((peer, addrs))
}
