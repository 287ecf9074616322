//! Preheat, end to end through the real `arcadectl` binary, a coordinator and real
//! agents (mesh on loopback): `plugin preheat ID@SELECTOR --label … --wait` resolves the
//! selector, only the matching agents fetch the content (from peers and the
//! coordinator), it is pinned so a job's download cannot evict it, and the command exits
//! 0 once every matching agent holds it verified. An agent whose `[trust]` refuses the
//! plugin fails the preheat without fetching a byte, and `--wait` exits non-zero saying
//! why; bad requests get clear errors.

use std::process::Output;
use std::time::Duration;

use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_p2p::{ContentId, PluginRef};
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::process::{arcadectl_async, stderr_failed, stdout_ok};
use arcade_tests::{ENROLL, TestCoordinator, create_job, eventually, registered_agents, wait_job};

const SIZE: usize = 256 * 1024;

async fn ctl(c: &TestCoordinator, args: &[&str]) -> Output {
    arcadectl_async(&c.url, args).await
}

/// A shell script of `SIZE` bytes that exits 0 (`tag` makes contents differ).
fn script(tag: &str) -> Vec<u8> {
    let mut s = format!("#!/bin/sh\nexit 0\n# {tag} ").into_bytes();
    s.resize(SIZE - 1, b'x');
    s.push(b'\n');
    s
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn wait_online(c: &TestCoordinator, n: usize) {
    let online = eventually(Duration::from_secs(30), || async {
        let all = registered_agents(c).await?;
        (all.iter().filter(|a| a.online).count() >= n).then_some(())
    })
    .await;
    assert!(online.is_some(), "{n} agents online");
}

fn holds(agent: &TestAgent, id: &str, version: &str, data: &[u8]) -> bool {
    let r = PluginRef::new(id, version).unwrap();
    agent
        .agent()
        .cache()
        .get(&r, &ContentId::of_bytes(data))
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_reaches_the_matching_agents_and_pins_against_eviction() {
    let c = TestCoordinator::start(|c| c.jobs.heartbeat_interval = Seconds::secs(1)).await;
    let old = script("tool 1.2.0");
    let new = script("tool 1.3.0");
    let next = script("tool 2.0.0");
    for (version, data) in [("1.2.0", &old), ("1.3.0", &new), ("2.0.0", &next)] {
        c.push("pre/tool", version, data, Default::default())
            .await
            .unwrap();
    }
    let other = script("job plugin");
    c.push("pre/job", "1.0.0", &other, Default::default())
        .await
        .unwrap();

    // eu-1's cache holds one plugin and a half: without a pin, the job's download would
    // evict the preheated plugin.
    let eu1 = TestAgent::start(&c.url, ENROLL, "eu-1", |cfg, _| {
        cfg.labels = labels(&[("zone", "eu"), ("host", "eu-1")]);
        cfg.cache.max_size = ByteSize((SIZE * 3 / 2) as u64);
    })
    .await;
    let eu2 = TestAgent::start(&c.url, ENROLL, "eu-2", |cfg, _| {
        cfg.labels = labels(&[("zone", "eu")]);
    })
    .await;
    let us1 = TestAgent::start(&c.url, ENROLL, "us-1", |cfg, _| {
        cfg.labels = labels(&[("zone", "us")]);
    })
    .await;
    wait_online(&c, 3).await;

    let out = ctl(
        &c,
        &[
            "plugin",
            "preheat",
            "pre/tool@^1.2",
            "--label",
            "zone=eu",
            "--pin",
            "1h",
            "--wait",
            "--timeout",
            "60s",
            "--json",
        ],
    )
    .await;
    let shown: serde_json::Value = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(shown["version"], "1.3.0", "{shown}");
    assert_eq!(shown["requested"], "^1.2", "{shown}");
    assert_eq!(
        (shown["total"].as_u64(), shown["done"].as_u64()),
        (Some(2), Some(2)),
        "{shown}"
    );
    assert_eq!(shown["failed"], 0, "{shown}");
    // Every byte of both copies is accounted for, by source.
    let by_source =
        shown["peer_bytes"].as_u64().unwrap() + shown["coordinator_bytes"].as_u64().unwrap();
    assert_eq!(by_source, 2 * SIZE as u64, "{shown}");

    assert!(holds(&eu1, "pre/tool", "1.3.0", &new));
    assert!(holds(&eu2, "pre/tool", "1.3.0", &new));
    assert!(
        !holds(&us1, "pre/tool", "1.3.0", &new),
        "us-1 does not match zone=eu"
    );
    assert_eq!(us1.server_bytes(), 0);
    assert!(
        !holds(&eu1, "pre/tool", "1.2.0", &old),
        "only the resolved version"
    );

    // A job's plugin overflows eu-1's cache: the pinned preheat stays.
    let job = create_job(&c, "pre/job", "1.0.0", "true", &[("host", "eu-1")]).await;
    let done = wait_job(&c, &job).await;
    assert_eq!(
        done.status(),
        pb::JobStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert!(holds(&eu1, "pre/job", "1.0.0", &other));
    assert!(
        holds(&eu1, "pre/tool", "1.3.0", &new),
        "the pinned plugin survived the eviction the job's download caused"
    );

    // preheat-status shows the same, as text.
    let id = shown["id"].as_str().unwrap();
    let text = stdout_ok(&ctl(&c, &["plugin", "preheat-status", id]).await);
    assert!(text.contains("2/2 agents done"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_preheats_fail_with_reasons_and_fetch_nothing() {
    let c = TestCoordinator::start(|c| c.jobs.heartbeat_interval = Seconds::secs(1)).await;
    let plain = script("unsigned");
    c.push("pre/plain", "1.0.0", &plain, Default::default())
        .await
        .unwrap();
    let guarded = script("guarded");
    c.push(
        "pre/guarded",
        "1.0.0",
        &guarded,
        pb::PushPluginHeader {
            allowed_labels: vec![pb::Label {
                key: "zone".into(),
                value: "us".into(),
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let key = arcade_p2p::publisher::PublisherKey::generate()
        .id()
        .to_string();
    let strict = TestAgent::start(&c.url, ENROLL, "strict", |cfg, _| {
        cfg.trust.publisher_keys = vec![key.clone()];
        cfg.trust.require_signature = true;
    })
    .await;
    wait_online(&c, 1).await;

    // The agent refuses unsigned content before fetching any of it.
    let why = stderr_failed(
        &ctl(
            &c,
            &[
                "plugin",
                "preheat",
                "pre/plain@1.0.0",
                "--wait",
                "--timeout",
                "60s",
            ],
        )
        .await,
    );
    assert!(
        why.contains("1 of 1 agents failed")
            && why.contains("strict: plugin pre/plain@1.0.0 refused")
            && why.contains("is not signed"),
        "{why}"
    );
    assert!(!holds(&strict, "pre/plain", "1.0.0", &plain));
    assert_eq!(strict.server_bytes(), 0);

    for (args, expected) in [
        (
            vec!["pre/plain@^2"],
            "no enabled version of pre/plain matches ^2",
        ),
        (vec!["pre/none@1.0.0"], "not found"),
        (vec!["pre/plain@1.2"], "no range operator"),
        (
            vec!["pre/guarded@1.0.0", "--label", "zone=eu"],
            "conflicts with the plugin's allowed label zone=us",
        ),
        (
            vec!["pre/plain@1.0.0", "--pin", "31d"],
            "longer than 30 days",
        ),
        (
            vec!["pre/plain@1.0.0", "--label", "zone=nowhere", "--wait"],
            "no online agent matches",
        ),
    ] {
        let mut all = vec!["plugin", "preheat"];
        all.extend(args.iter().copied());
        let why = stderr_failed(&ctl(&c, &all).await);
        assert!(why.contains(expected), "{args:?}: {why}");
    }
    let why = stderr_failed(&ctl(&c, &["plugin", "preheat-status", "ph-000000000000"]).await);
    assert!(why.contains("no active preheat"), "{why}");
}
