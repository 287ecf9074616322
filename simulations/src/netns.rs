//! Kernel-shaped links for the real-stack engine (`network = "netns"`): every agent in
//! its own network namespace, joined to a hub namespace by a veth pair, with `tc tbf`
//! shaping what crosses it. The coordinator and the harness run in the hub, on a bridge
//! that connects every agent's veth:
//!
//! ```text
//!  hub namespace: br0 10.201.0.1/16 (coordinator; tbf = server up_mibps)
//!    ├── v0 ══ eth0 10.201.0.2  agent 0's namespace (tbf on eth0 = its up_mibps;
//!    ├── v1 ══ eth0 10.201.0.3   tbf on v0 = its down_mibps)
//!    └── …
//! ```
//!
//! Agent-to-agent traffic is bridged in the hub, so it passes the sender's upload and
//! the receiver's download qdiscs and never the coordinator's. Namespaces are per thread
//! in Linux and a socket belongs to the namespace of the thread that made it, so each
//! agent gets its own tokio runtime whose threads are started inside its namespace
//! ([`runtime_in`]); everything the agent does runs there.
//!
//! Needs root (or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and the `ip` and `tc` commands
//! (iproute2). Addresses are private and never leave the namespaces. The namespaces are
//! removed when [`Namespaces`] is dropped; ones left by a killed run (their process gone)
//! are removed by the next run. Latency is not simulated here (this kernel has no
//! `netem`); the model engine has latency.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::Context as _;

use crate::scenario::Link;

/// Prefix of every namespace this module makes.
const PREFIX: &str = "arcade-sim-";
/// Directory where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// The hub's address (the coordinator's), on the bridge.
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// Most agents (the /16 holds more, the real engine's limit is lower).
pub const MAX_AGENTS: usize = 4096;

/// The namespaces of one run; removed on drop.
#[derive(Debug)]
pub struct Namespaces {
    tag: String,
    agents: usize,
}

/// Agent `n`'s address.
pub fn agent_ip(n: usize) -> Ipv4Addr {
    let host = n as u32 + 2;
    Ipv4Addr::new(10, 201, (host >> 8) as u8, (host & 0xff) as u8)
}

impl Namespaces {
    /// Makes the hub and one namespace per link in `agents`, shaped as the links say
    /// (`up_mibps` / `down_mibps` of 0 = unshaped).
    pub fn create(server: &Link, agents: &[Link]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            agents.len() <= MAX_AGENTS,
            "network namespaces for at most {MAX_AGENTS} agents"
        );
        remove_stale();
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Self {
            tag: format!("{PREFIX}{}-{run}-", std::process::id()),
            agents: 0,
        };
        let hub = ns.hub();
        ip(&["netns", "add", &hub]).context(
            "making a network namespace (the netns network needs root and iproute2's `ip`)",
        )?;
        let mut ns = ns;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{HUB_IP}/16"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        shape(&hub, "br0", server.up_mibps)?;
        for (n, link) in agents.iter().enumerate() {
            let name = ns.agent(n);
            ip(&["netns", "add", &name])?;
            ns.agents = n + 1;
            let port = format!("v{n}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &name,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/16", agent_ip(n)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            shape(&name, "eth0", link.up_mibps)?;
            shape(&hub, &port, link.down_mibps)?;
        }
        Ok(ns)
    }

    /// The hub namespace's name (coordinator and harness).
    pub fn hub(&self) -> String {
        format!("{}hub", self.tag)
    }

    /// Agent `n`'s namespace name.
    pub fn agent(&self, n: usize) -> String {
        format!("{}{n}", self.tag)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (veth pairs go with either end).
        for n in 0..self.agents {
            let _ = ip(&["netns", "delete", &self.agent(n)]);
        }
        let _ = ip(&["netns", "delete", &self.hub()]);
    }
}

/// A tokio runtime with `workers` threads, all inside network namespace `ns`: every
/// socket its tasks open belongs to that namespace. Spawn work on it (`spawn`), do not
/// `block_on` from outside: `block_on` runs on the calling thread's namespace.
pub fn runtime_in(ns: &str, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let path = format!("{NETNS_DIR}/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // Threads inherit the namespace of the thread that starts them: enter it on a
    // thread of our own and build the runtime (which starts its workers) there.
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {ns}"))?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(ns.to_owned())
                .enable_all()
                .build()
                .context("starting a runtime")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread entering {ns} panicked"))?
    })
}

/// `tbf` on `dev` in namespace `ns` at `mibps` (0 = none). The bucket holds 50 ms of the
/// rate (at least 64 KiB); up to 200 ms of packets queue before drops, as at a real
/// bottleneck. On a slow link the stack's segmentation-offload batches are capped at a
/// quarter of that queue (`gso_max_size`), so that it holds several packets: with 64 KiB
/// batches a 0.25 MiB/s link's 51 KiB queue held none while another waited, and one
/// 2 MiB transfer over it retransmitted 43 % of its segments. Batches are not disabled
/// outright: single segments cost the kernel so much more per byte that they doubled
/// the CPU of whole fleets, which share two cores with it.
fn shape(ns: &str, dev: &str, mibps: f64) -> anyhow::Result<()> {
    /// Packets queue at most this long at a shaper.
    const QUEUE_MS: u32 = 200;
    if !(mibps > 0.0 && mibps.is_finite()) {
        return Ok(());
    }
    let bytes_per_s = mibps * (1u64 << 20) as f64;
    let queue = bytes_per_s * f64::from(QUEUE_MS) / 1000.0;
    let batch = (queue / 4.0).clamp(4096.0, 65536.0) as u64;
    if batch < 65536 {
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "dev",
            dev,
            "gso_max_size",
            &batch.to_string(),
        ])?;
    }
    let burst = (bytes_per_s / 20.0).max(64.0 * 1024.0) as u64;
    let rate = format!("{}bit", (bytes_per_s * 8.0) as u64);
    let burst = burst.to_string();
    let status = Command::new("tc")
        .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate"])
        .args([&rate, "burst", &burst, "latency", &format!("{QUEUE_MS}ms")])
        .output()
        .context("running `tc` (iproute2)")?;
    anyhow::ensure!(
        status.status.success(),
        "tc qdisc add dev {dev} in {ns}: {}",
        String::from_utf8_lossy(&status.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Removes namespaces of earlier runs whose process is gone (killed before its drop).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_are_distinct_and_never_the_hub() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..MAX_AGENTS {
            let a = agent_ip(n);
            assert_ne!(a, HUB_IP);
            assert_eq!(a.octets()[..2], [10, 201]);
            assert_ne!(a, Ipv4Addr::new(10, 201, 255, 255), "the broadcast address");
            assert!(seen.insert(a), "{a} twice");
        }
    }
}
