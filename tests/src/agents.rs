//! Agents for the end-to-end tests: real `RunningAgent`s started in-process (own data
//! directory, own metrics registry) against a coordinator URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arcade_agent::config::AgentConfig;
use arcade_agent::runtime::RunningAgent;
use arcade_p2p::settings::Seconds;

/// A test agent and its directory.
pub struct TestAgent {
    /// The running agent (None once stopped).
    pub running: Option<RunningAgent>,
    /// Its config.
    pub config: AgentConfig,
    /// Its temp dir (data_dir is `dir/data`).
    pub dir: tempfile::TempDir,
}

/// A config for tests: the given coordinator and id, metrics off, short polls.
pub fn agent_config(dir: &Path, coordinator: &str, enroll_token: &str, id: &str) -> AgentConfig {
    let mut c = AgentConfig {
        id: id.into(),
        coordinator: coordinator.into(),
        enroll_token: enroll_token.into(),
        data_dir: dir.join("data"),
        metrics_listen: "off".into(),
        ..Default::default()
    };
    c.jobs.poll_wait = Seconds::secs(2);
    c.jobs.shutdown_grace = Seconds::secs(5);
    c.download.backoff = Seconds(Duration::from_millis(50));
    c.mesh.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    c.mesh.allow_loopback = true;
    c
}

impl TestAgent {
    /// Starts an agent with [`agent_config`] adjusted by `tweak` (which may also put
    /// files under the plugin directory before start).
    pub async fn start(
        coordinator: &str,
        enroll_token: &str,
        id: &str,
        tweak: impl FnOnce(&mut AgentConfig, &Path),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = agent_config(dir.path(), coordinator, enroll_token, id);
        tweak(&mut config, dir.path());
        let running = RunningAgent::start(config.clone().validate().expect("valid agent config"))
            .await
            .expect("agent starts");
        Self {
            running: Some(running),
            config,
            dir,
        }
    }

    /// The running agent.
    pub fn agent(&self) -> &RunningAgent {
        self.running.as_ref().expect("agent is running")
    }

    /// Plugin cache root.
    pub fn plugin_dir(&self) -> PathBuf {
        self.config.data_dir.join("plugins")
    }

    /// Verified bytes fetched from the coordinator so far.
    pub fn server_bytes(&self) -> u64 {
        self.agent().metrics().fetched_from("server")
    }

    /// Graceful stop.
    pub async fn stop(&mut self) {
        if let Some(a) = self.running.take() {
            a.shutdown().await.expect("clean shutdown");
        }
    }
}
