//! The control plane at fleet scale, through real gRPC over TCP against an in-process
//! coordinator: one job with 1,000 agents waiting is leased by exactly one of them with
//! exactly one store write for the lease; polls that find nothing write nothing; per-agent
//! state and registration floods are bounded with clear errors.

use std::time::Duration;

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use arcade_simulations::client::signed;
use arcade_tests::{ADMIN, Conn, TestCoordinator, command_job, eventually};
use tokio::task::JoinSet;
use tonic::Code;

/// `n` agents registered over a few shared connections; returns (id, client).
async fn register_many(
    c: &Conn,
    n: usize,
    connections: usize,
) -> Vec<(
    String,
    arcade_proto::v1::agent_client::AgentClient<arcade_tests::Authed>,
)> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            arcade_proto::client_endpoint(&c.url)
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut out = Vec::new();
    for i in 0..n {
        let ch = channels[i % connections].clone();
        let enroll = arcade_tests::Bearer::new(&c.enroll_token).unwrap();
        let mut client = arcade_proto::v1::agent_client::AgentClient::new(
            tonic::service::interceptor::InterceptedService::new(ch.clone(), enroll),
        );
        let id = format!("waiter-{i:04}");
        let token = client
            .register(signed(pb::RegisterRequest {
                agent_id: id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .agent_token;
        let authed = tonic::service::interceptor::InterceptedService::new(
            ch,
            arcade_tests::Bearer::new(&token).unwrap(),
        );
        out.push((id, arcade_proto::v1::agent_client::AgentClient::new(authed)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_with_1000_agents_waiting_is_leased_once_with_one_store_write() {
    let c = TestCoordinator::start(|c| {
        c.agents.register_rate = 0;
        c.jobs.long_poll_max = arcade_p2p::settings::Seconds::secs(60);
    })
    .await;
    let metrics = c.running.as_ref().unwrap().metrics().clone();
    let agents = register_many(&c, 1000, 20).await;

    let writes_before = metrics.store.write_count("claim_job");
    let creates_before = metrics.store.write_count("create_job");
    let commits_before = metrics.store.commit_count();
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let mut polls = JoinSet::new();
    for (id, mut client) in agents {
        let tx = tx.clone();
        polls.spawn(async move {
            let jobs = client
                .fetch_job(pb::FetchJobRequest {
                    agent_id: id.clone(),
                    max_jobs: 1,
                    wait_seconds: 60,
                })
                .await
                .unwrap()
                .into_inner()
                .jobs;
            let _ = tx.send((id, jobs));
        });
    }
    let all_waiting = eventually(Duration::from_secs(30), || async {
        (metrics.agents_waiting.get() == 1000).then_some(())
    })
    .await;
    assert!(
        all_waiting.is_some(),
        "only {} of 1000 agents are waiting",
        metrics.agents_waiting.get()
    );
    // 1,000 open polls that found nothing wrote nothing.
    assert_eq!(metrics.store.commit_count(), commits_before);

    let id = command_job(&c, "true").await;
    let (winner, jobs) = tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .expect("a waiting agent gets the job")
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job_id, id);
    // Nobody else is woken or handed anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        got.try_recv().is_err(),
        "a second agent returned from its poll"
    );
    assert_eq!(metrics.agents_waiting.get(), 999);
    assert_eq!(metrics.store.write_count("claim_job") - writes_before, 1);
    assert_eq!(metrics.store.write_count("create_job") - creates_before, 1);
    let commits = metrics.store.commit_count() - commits_before;
    assert!(
        (1..=2).contains(&commits),
        "{commits} commits for one create and one lease"
    );
    let job = c
        .jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.status(), pb::JobStatus::Running);
    assert_eq!(job.agent_id, winner);
    polls.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_state_and_registration_floods_are_bounded() {
    let c = TestCoordinator::start(|c| {
        c.agents.max_agents = 50;
        c.agents.register_rate = 0;
        c.agents.max_installed = 100;
    })
    .await;
    let mut enroll = c.agent(&c.enroll_token).await;
    let register = |id: String, labels: Vec<pb::Label>, hostname: String, n: usize| {
        signed(pb::RegisterRequest {
            agent_id: id,
            hostname,
            labels,
            installed_plugins: (0..n)
                .map(|i| pb::InstalledPlugin {
                    plugin_id: "p/x".into(),
                    version: format!("1.0.{i}"),
                    sha256: ContentId::of_bytes(&i.to_le_bytes()).to_hex(),
                })
                .collect(),
            ..Default::default()
        })
    };
    // Bad input: clear InvalidArgument naming the limit.
    let cases: Vec<(pb::RegisterRequest, &str)> = vec![
        (
            register("big".into(), vec![], String::new(), 101),
            "agents.max_installed",
        ),
        (
            register(
                "labels".into(),
                (0..65)
                    .map(|i| pb::Label {
                        key: format!("k{i}"),
                        value: "v".into(),
                    })
                    .collect(),
                String::new(),
                0,
            ),
            "labels",
        ),
        (
            register("x".repeat(129), vec![], String::new(), 0),
            "agent_id",
        ),
        (
            register("host".into(), vec![], "h".repeat(257), 0),
            "hostname",
        ),
    ];
    for (req, says) in cases {
        let err = enroll.register(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{says}: {err:?}");
        assert!(err.message().contains(says), "{says}: {err:?}");
    }
    // 100 installed plugins is fine, and so is a heartbeat with 100; 101 is not.
    let token = enroll
        .register(register("full".into(), vec![], String::new(), 100))
        .await
        .unwrap()
        .into_inner()
        .agent_token;
    let err = c
        .agent(&token)
        .await
        .heartbeat(pb::HeartbeatRequest {
            installed_plugins: register(String::new(), vec![], String::new(), 101)
                .installed_plugins,
            installed_set: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A flood of new ids stops at agents.max_agents; known ids may still re-register.
    let mut refused = 0;
    for i in 0..200 {
        match enroll
            .register(register(format!("flood-{i}"), vec![], String::new(), 0))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("agents.max_agents"), "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(
        refused,
        200 - 49,
        "50 agents fit: `full` and 49 of the flood"
    );
    enroll
        .register(register("flood-0".into(), vec![], String::new(), 0))
        .await
        .expect("a registered id may register again at the cap");
    let listed = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 50);
}

#[tokio::test]
async fn registrations_beyond_the_rate_are_refused_with_a_retry_hint() {
    let c = TestCoordinator::start(|c| c.agents.register_rate = 5).await;
    let mut enroll = c.agent(&c.enroll_token).await;
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..30 {
        match enroll
            .register(signed(pb::RegisterRequest {
                agent_id: format!("r{i}"),
                ..Default::default()
            }))
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.metadata().get("arcade-retry-after-ms").is_some());
                limited += 1;
            }
        }
    }
    assert!((5..30).contains(&ok), "{ok} accepted");
    assert_eq!(ok + limited, 30);
}

#[tokio::test]
async fn peer_hints_come_from_the_holder_index_and_drop_removed_agents() {
    let c = TestCoordinator::start(|c| c.agents.register_rate = 0).await;
    let data = arcade_tests::content(100_000, 3);
    let sha = ContentId::of_bytes(&data).to_hex();
    c.push("tool/x", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let held = pb::InstalledPlugin {
        plugin_id: "tool/x".into(),
        version: "1.0.0".into(),
        sha256: sha,
    };
    let mut holders = Vec::new();
    for i in 0..40 {
        let id = format!("holder-{i:02}");
        let t = c
            .register_with(&id, &[], vec![held.clone()], true)
            .await
            .unwrap();
        c.agent(&t)
            .await
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap();
        holders.push(id);
    }
    let worker = c.register("worker", &[], vec![]).await;
    let hints = |token: String| {
        let c = &c;
        async move {
            c.agent(&token)
                .await
                .get_manifest(pb::GetManifestRequest {
                    plugin_id: "tool/x".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .plugin
                .unwrap()
                .peer_hints
                .into_iter()
                .map(|h| h.agent_id)
                .collect::<Vec<_>>()
        }
    };
    let first = hints(worker.clone()).await;
    assert_eq!(first.len(), 16, "{first:?}");
    // Removing a hinted agent takes it out of every later hint list.
    let gone = first[0].clone();
    c.fleet(ADMIN)
        .await
        .remove_agent(pb::RemoveAgentRequest {
            agent_id: gone.clone(),
        })
        .await
        .unwrap();
    for _ in 0..5 {
        assert!(!hints(worker.clone()).await.contains(&gone));
    }
    let err = c
        .fleet(ADMIN)
        .await
        .remove_agent(pb::RemoveAgentRequest { agent_id: gone })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn heartbeats_write_nothing_unless_the_installed_list_changed() {
    let c = TestCoordinator::start(|_| {}).await;
    let metrics = c.running.as_ref().unwrap().metrics().clone();
    let plugin = |v: &str| pb::InstalledPlugin {
        plugin_id: "p/x".into(),
        version: v.into(),
        sha256: ContentId::of_bytes(v.as_bytes()).to_hex(),
    };
    let token = c.register("hb", &[], vec![plugin("1.0.0")]).await;
    let mut agent = c.agent(&token).await;
    let commits = metrics.store.commit_count();
    for _ in 0..5 {
        agent
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap();
        agent
            .heartbeat(pb::HeartbeatRequest {
                installed_plugins: vec![plugin("1.0.0")],
                installed_set: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(metrics.store.commit_count(), commits, "10 heartbeats wrote");
    agent
        .heartbeat(pb::HeartbeatRequest {
            installed_plugins: vec![plugin("1.0.0"), plugin("2.0.0")],
            installed_set: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(metrics.store.write_count("set_installed"), 1);
    let listed = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(listed[0].installed_plugins.len(), 2);
}
