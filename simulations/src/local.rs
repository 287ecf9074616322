//! What the demo and the real-stack engine share: an embedded coordinator whose data
//! lives in a temp directory, agents on loopback, and jobs pinned to one agent by its
//! `name` label.

use std::path::Path;
use std::time::Duration;

use arcade_agent::config::AgentConfig;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_p2p::settings::Seconds;
use arcade_proto::v1 as pb;

use crate::client::Conn;

/// An embedded coordinator's config: 127.0.0.1 on a free port, no metrics listener, data
/// under `dir/coordinator`, 500 ms heartbeats (agents are seen and hinted quickly).
pub fn coordinator_config(dir: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "off".into(),
        data_dir: dir.join("coordinator"),
        ..Default::default()
    };
    c.jobs.heartbeat_interval = Seconds(Duration::from_millis(500));
    c
}

/// A loopback agent's config: enrolled at `conn`, data under `dir/<id>`, no metrics
/// listener, labelled `name = <id>` (see [`pinned_job`]), libp2p on 127.0.0.1.
pub fn agent_config(conn: &Conn, dir: &Path, id: &str) -> AgentConfig {
    let mut c = AgentConfig {
        id: id.into(),
        coordinator: conn.url.clone(),
        enroll_token: conn.enroll_token.clone(),
        data_dir: dir.join(id),
        metrics_listen: "off".into(),
        ..Default::default()
    };
    c.labels.insert("name".into(), id.into());
    c.jobs.poll_wait = Seconds::secs(5);
    c.mesh.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    c.mesh.allow_loopback = true;
    c
}

/// A job for agent `agent` only (its `name` label) that runs `command` and needs every
/// `plugins` id at `version` in `stages`.
pub fn pinned_job(
    name: &str,
    agent: &str,
    command: &str,
    plugins: &[&str],
    version: &str,
    stages: &[pb::Stage],
) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        name: name.into(),
        commands: vec![command.into()],
        label_selector: vec![pb::Label {
            key: "name".into(),
            value: agent.into(),
        }],
        required_plugins: plugins
            .iter()
            .map(|id| pb::RequiredPlugin {
                plugin_id: (*id).into(),
                version: version.into(),
                stages: stages.iter().map(|s| *s as i32).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
