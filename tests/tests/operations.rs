//! What an operator meets with the ecosystem's own tools: logs written to a file carry
//! no colour escapes and `--log-format json` writes one JSON object per line; gRPC
//! reflection answers both `v1` and `v1alpha` clients (grpcurl, grpcui, Postman, Evans);
//! `promtool check metrics` passes on the coordinator's and an agent's `/metrics`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arcade_tests::process::workspace_bin;
use arcade_tests::{ADMIN, ENROLL};

/// Runs `arcade-coordinator` with its stderr in a file until it has logged that it
/// listens, then stops it; returns what it logged.
fn coordinator_log(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!("admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n"),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(workspace_bin("arcade-coordinator"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("coordinator started") || started.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("coordinator started"),
        "no start-up line: {text}"
    );
    text
}

#[test]
fn logs_to_a_file_are_plain_text_and_json_is_one_object_per_line() {
    let human = coordinator_log(&[]);
    assert!(
        !human.contains('\u{1b}'),
        "ANSI escapes in a log written to a file: {human:?}"
    );
    assert!(human.contains("INFO"), "{human}");

    let json = coordinator_log(&["--log-format", "json"]);
    let mut lines = 0;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 1);
    assert!(!json.contains('\u{1b}'));
}

/// Asks a reflection service (module `$pb` of `tonic_reflection::pb`: `v1` or
/// `v1alpha`, the same messages in two packages) over `$channel` for its services.
macro_rules! list_services {
    ($pb:ident, $channel:expr) => {{
        use tonic_reflection::pb::$pb::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect(concat!(stringify!($pb), " reflection answers"))
            .into_inner();
        match answers
            .message()
            .await
            .unwrap()
            .expect("one answer")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(l)) => l
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("not a service list: {other:?}"),
        }
    }};
}

/// The services a reflection client of either version lists.
async fn reflected_services(url: &str, alpha: bool) -> Vec<String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    if alpha {
        list_services!(v1alpha, channel)
    } else {
        list_services!(v1, channel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_through_v1_and_v1alpha() {
    let c = arcade_tests::TestCoordinator::start(|_| {}).await;
    for alpha in [false, true] {
        let mut services = reflected_services(&c.url, alpha).await;
        services.sort();
        for wanted in [
            "arcade.v1.Agent",
            "arcade.v1.Fleet",
            "arcade.v1.Jobs",
            "arcade.v1.PluginAdmin",
        ] {
            assert!(
                services.iter().any(|s| s == wanted),
                "v1alpha={alpha}: {wanted} missing from {services:?}"
            );
        }
    }
}

/// `promtool check metrics` on one scrape: Ok, or what it said.
fn promtool_check(body: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// Both endpoints after a job (so that labelled families have samples) pass
/// `promtool check metrics`. `.ci/run` installs promtool (Debian's `prometheus`); where
/// it is missing the test says so and checks nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_both_metrics_endpoints() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool is not installed: skipping (apt-get install prometheus)");
        return;
    }
    let c = arcade_tests::TestCoordinator::start(|_| {}).await;
    let a = arcade_tests::agents::TestAgent::start(&c.url, ENROLL, "scraped", |cfg, _| {
        cfg.metrics_listen = "127.0.0.1:0".into();
    })
    .await;
    let plugin = arcade_tests::script(200_000, 3);
    c.push("ops/tool", "1.0.0", &plugin, Default::default())
        .await
        .unwrap();
    arcade_tests::run_ok(&c, "ops/tool", "1.0.0", &[]).await;
    let endpoints = [
        (
            "coordinator",
            c.conn.metrics_addr.expect("coordinator metrics"),
        ),
        ("agent", a.agent().metrics_addr.expect("agent metrics")),
    ];
    for (who, addr) in endpoints {
        let answer = arcade_simulations::client::scrape(addr).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        assert!(body.contains("plugin_download_total"), "{who}: {body}");
        if let Err(said) = promtool_check(body) {
            panic!("promtool check metrics fails on the {who}'s /metrics:\n{said}\n{body}");
        }
    }
}

/// The row of `fleet status --json` for the content `sha`.
fn plugin_status(status: &serde_json::Value, sha: &str) -> Option<serde_json::Value> {
    status["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["sha256"] == sha)
        .cloned()
}

/// `arcadectl fleet status` and `arcadectl job watch` against a coordinator and three
/// agents: labels online, a fetch in flight (the coordinator's egress is slowed so it
/// lasts), holders once done, and a job followed phase by phase to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_and_job_watch_show_what_the_fleet_does() {
    use arcade_p2p::settings::{ByteSize, Seconds};
    use arcade_tests::agents::TestAgent;
    use arcade_tests::process::{arcadectl_async, stdout_ok};

    let c = arcade_tests::TestCoordinator::start(|cfg| {
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
        cfg.serve.egress_rate = ByteSize::kib(256);
    })
    .await;
    let mut agents = Vec::new();
    for (id, zone) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")] {
        agents.push(
            TestAgent::start(&c.url, ENROLL, id, |cfg, _| {
                cfg.labels.insert("zone".into(), zone.into());
                cfg.mesh.enabled = false;
            })
            .await,
        );
    }
    let plugin = arcade_tests::script(2 << 20, 9);
    c.push("ops/slow", "1.0.0", &plugin, Default::default())
        .await
        .unwrap();
    let sha = arcade_p2p::ContentId::of_bytes(&plugin).to_hex();

    let status = |c: &arcade_tests::TestCoordinator| {
        let url = c.url.clone();
        async move {
            let out = arcadectl_async(&url, &["fleet", "status", "--json"]).await;
            serde_json::from_str::<serde_json::Value>(&stdout_ok(&out)).unwrap()
        }
    };
    let s = arcade_tests::eventually(Duration::from_secs(10), || async {
        let s = status(&c).await;
        (s["agents_online"] == 3).then_some(s)
    })
    .await
    .expect("three agents online");
    assert_eq!(s["agents_offline"], 0);
    assert_eq!(s["labels"]["zone=eu"]["online"], 2);
    assert_eq!(s["labels"]["zone=us"]["online"], 1);
    assert_eq!(s["jobs_queued"], 0);

    // A job on us-1 that fetches for ~4 s (2 MiB at 256 KiB/s after a 1 MiB burst),
    // then sleeps 2 s.
    let out = arcadectl_async(
        &c.url,
        &[
            "job",
            "create",
            "--plugin",
            "ops/slow@1.0.0",
            "--label",
            "zone=us",
            "--cmd",
            "sleep 2",
        ],
    )
    .await;
    let job = stdout_ok(&out).trim().to_owned();
    let watch = {
        let (url, job) = (c.url.clone(), job.clone());
        tokio::spawn(async move { arcadectl_async(&url, &["job", "watch", &job, "--json"]).await })
    };
    let mid = arcade_tests::eventually(Duration::from_secs(20), || async {
        let s = status(&c).await;
        let p = plugin_status(&s, &sha)?;
        (p["fetching"] == 1 && p["from_coordinator"] == 1).then_some((s, p))
    })
    .await
    .expect("fleet status shows the fetch in flight");
    assert_eq!(mid.1["id"], "ops/slow");
    assert_eq!(mid.1["holders"], 0);
    assert!(mid.1["coordinator_bytes"].as_u64().unwrap() > 0);
    assert_eq!(mid.0["jobs_running"], 1);

    let watched = watch.await.unwrap();
    let text = stdout_ok(&watched);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let phases: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["progress"]["phase"].as_str())
        .collect();
    assert!(phases.contains(&"fetching"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l["progress"]["phase"] == "commands" && l["progress"]["current"] == "sleep 2"),
        "{text}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "succeeded", "{text}");
    assert_eq!(last["id"], job.as_str());

    // Done: us-1 holds it, nothing in flight.
    let s = arcade_tests::eventually(Duration::from_secs(10), || async {
        let s = status(&c).await;
        let p = plugin_status(&s, &sha)?;
        (p["holders"] == 1 && p["fetching"] == 0 && p["from_coordinator"] == 0).then_some(s)
    })
    .await
    .expect("the holder is listed and no fetch is in flight");
    assert_eq!(s["jobs_running"], 0);
    let human = stdout_ok(&arcadectl_async(&c.url, &["fleet", "status"]).await);
    assert!(human.starts_with("agents  3 online, 0 offline"), "{human}");
    assert!(human.contains("ops/slow"), "{human}");
}

/// `mesh.download_rate` bounds an agent's fetches from the coordinator and from peers
/// alike: 2 MiB at 512 KiB/s with one 1 MiB chunk of burst cannot take less than 2 s
/// (a lower bound: the limiter's promise, whatever the machine's speed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_rate_bounds_fetches_from_the_coordinator_and_from_peers() {
    use std::sync::atomic::Ordering;

    use arcade_p2p::settings::{ByteSize, Seconds};
    use arcade_tests::TestCoordinator;
    use arcade_tests::agents::TestAgent;
    use arcade_tests::proxy::AgentProxy;

    const RATE: u64 = 512 << 10;
    let floor = Duration::from_secs_f64(((2u64 << 20) - (1 << 20)) as f64 / RATE as f64);
    let c = TestCoordinator::start(|cfg| {
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
        cfg.plugin.chunk_size = ByteSize::mib(1);
    })
    .await;
    let (one, two) = (
        arcade_tests::script(2 << 20, 1),
        arcade_tests::script(2 << 20, 2),
    );
    c.push("ops/a", "1.0.0", &one, Default::default())
        .await
        .unwrap();
    c.push("ops/b", "1.0.0", &two, Default::default())
        .await
        .unwrap();
    let run_on = |plugin: &'static str, who: &'static str| {
        let c = &c;
        async move {
            let started = Instant::now();
            arcade_tests::run_ok(c, plugin, "1.0.0", &[("name", who)]).await;
            started.elapsed()
        }
    };
    let agent = |url: String, who: &'static str, rate: u64| async move {
        TestAgent::start(&url, ENROLL, who, |cfg, _| {
            cfg.labels.insert("name".into(), who.into());
            cfg.mesh.download_rate = ByteSize(rate);
        })
        .await
    };

    // From the coordinator.
    let slow = agent(c.url.clone(), "slow", RATE).await;
    let took = run_on("ops/a", "slow").await;
    assert_eq!(slow.server_bytes(), one.len() as u64);
    assert!(took >= floor, "2 MiB at 512 KiB/s in {took:?}");

    // From a peer (the coordinator refuses every chunk to this agent).
    let _seed = agent(c.url.clone(), "seed", 0).await;
    run_on("ops/b", "seed").await;
    let sha = arcade_p2p::ContentId::of_bytes(&two).to_hex();
    arcade_tests::wait_holder(&c, "seed", &sha).await;
    let proxy = AgentProxy::start(&c.url).await;
    proxy.tamper.refuse_downloads.store(true, Ordering::SeqCst);
    let peer_slow = agent(proxy.url.clone(), "peer-slow", RATE).await;
    let took = run_on("ops/b", "peer-slow").await;
    assert_eq!(peer_slow.server_bytes(), 0);
    assert_eq!(
        peer_slow.agent().metrics().fetched_from("peer"),
        two.len() as u64
    );
    assert!(took >= floor, "2 MiB from a peer at 512 KiB/s in {took:?}");
}
