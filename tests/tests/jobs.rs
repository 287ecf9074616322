//! Jobs: creation, assignment with label selectors and plugin ACLs, peer hints,
//! results, long-polling, lease expiry and restart persistence.

use std::time::{Duration, Instant};

use arcade_p2p::ContentId;
use arcade_p2p::mesh::ticket::{PeerId, TicketVerifier};
use arcade_p2p::settings::Seconds;
use arcade_proto::v1 as pb;
use arcade_simulations::client::{agent_peer_id, signed};
use arcade_tests::{ADMIN, TestCoordinator, content, eventually};
use tonic::Code;

fn required(id: &str, version: &str, stages: Vec<pb::Stage>) -> pb::RequiredPlugin {
    pb::RequiredPlugin {
        plugin_id: id.into(),
        version: version.into(),
        stages: stages.into_iter().map(|s| s as i32).collect(),
        ..Default::default()
    }
}

fn label(k: &str, v: &str) -> pb::Label {
    pb::Label {
        key: k.into(),
        value: v.into(),
    }
}

async fn fetch(c: &TestCoordinator, token: &str, wait: u32) -> Vec<pb::Job> {
    c.agent(token)
        .await
        .fetch_job(pb::FetchJobRequest {
            max_jobs: 4,
            wait_seconds: wait,
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner()
        .jobs
}

async fn job(c: &TestCoordinator, id: &str) -> pb::JobDetail {
    c.jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .expect("get job")
        .into_inner()
        .job
        .expect("job")
}

#[tokio::test]
async fn job_carries_plugins_manifests_and_peer_hints_and_records_results() {
    let c = TestCoordinator::start(|_| {}).await;
    let data = content(200_000, 1);
    let sha = ContentId::of_bytes(&data).to_hex();
    c.push("notify/slack", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let holder = pb::InstalledPlugin {
        plugin_id: "notify/slack".into(),
        version: "1.0.0".into(),
        sha256: sha.clone(),
    };
    // Two holders: one in the requester's zone, one elsewhere.
    let near_peer = agent_peer_id("holder-near");
    let far = c
        .register_with("holder-far", &[("zone", "us")], vec![holder.clone()], true)
        .await
        .unwrap();
    let near = c
        .register_with("holder-near", &[("zone", "eu")], vec![holder], true)
        .await
        .unwrap();
    for t in [&far, &near] {
        c.agent(t)
            .await
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap();
    }
    let worker = c.register("worker", &[("zone", "eu")], vec![]).await;

    let mut jobs = c.jobs(ADMIN).await;
    let err = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![required("notify/nope", "1.0.0", vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("notify/nope@1.0.0"), "{err}");

    let id = jobs
        .create_job(pb::CreateJobRequest {
            name: "build".into(),
            commands: vec!["make".into()],
            required_plugins: vec![required(
                "notify/slack",
                "1.0.0",
                vec![pb::Stage::Before, pb::Stage::After],
            )],
            parameters: [("branch".to_string(), "main".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(job(&c, &id).await.status(), pb::JobStatus::Queued);

    let got = fetch(&c, &worker, 0).await;
    assert_eq!(got.len(), 1);
    let j = &got[0];
    assert_eq!(j.job_id, id);
    assert_eq!(j.commands, vec!["make"]);
    assert_eq!(j.attempt, 1);
    assert_eq!(j.parameters.get("branch").map(String::as_str), Some("main"));
    let p = &j.plugins[0];
    assert_eq!(p.plugin_id, "notify/slack");
    assert_eq!(p.checksum, sha);
    assert_eq!(p.size, data.len() as i64);
    assert_eq!(p.location(), pb::PluginLocation::Server);
    assert_eq!(
        p.stages,
        vec![pb::Stage::Before as i32, pb::Stage::After as i32]
    );
    let m = arcade_p2p::Manifest::from_proto(p.manifest.as_ref().unwrap()).unwrap();
    assert_eq!(m.content_id().to_hex(), sha);
    let hints: Vec<&str> = p.peer_hints.iter().map(|h| h.agent_id.as_str()).collect();
    assert_eq!(hints, vec!["holder-near", "holder-far"], "same zone first");
    assert_eq!(p.peer_hints[0].peer_id, near_peer);
    assert!(p.peer_hints[0].complete);
    assert_eq!(job(&c, &id).await.status(), pb::JobStatus::Running);

    // Agents handed the plugin without holding it are fetching it: later askers are
    // pointed at them too (after the complete holders, `complete = false`).
    let hints_for = async |agent: &str| {
        let token = c
            .register_with(agent, &[("zone", "eu")], vec![], true)
            .await
            .unwrap();
        let mut client = c.agent(&token).await;
        client
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap();
        client
            .get_manifest(pb::GetManifestRequest {
                agent_id: agent.into(),
                plugin_id: "notify/slack".into(),
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
            .map(|h| (h.agent_id, h.complete))
            .collect::<Vec<_>>()
    };
    let first = hints_for("fetcher-a").await;
    assert_eq!(
        first,
        [("holder-near".into(), true), ("holder-far".into(), true)],
        "nobody else is fetching yet (the worker has no peer id)"
    );
    let second = hints_for("fetcher-b").await;
    assert_eq!(
        second,
        [
            ("holder-near".into(), true),
            ("holder-far".into(), true),
            ("fetcher-a".into(), false)
        ]
    );

    // Nothing more to lease.
    assert!(fetch(&c, &worker, 0).await.is_empty());

    let result = pb::PluginExecutionResult {
        plugin_id: "notify/slack".into(),
        plugin_name: "notify/slack".into(),
        version: "1.0.0".into(),
        stage: "before".into(),
        success: true,
        start_time: 1,
        end_time: 2,
        result: r#"{"ok":true}"#.into(),
        ..Default::default()
    };
    c.agent(&worker)
        .await
        .report_job_result(pb::ReportJobResultRequest {
            job_id: id.clone(),
            status: pb::JobStatus::Succeeded as i32,
            output_tail: "built".into(),
            plugin_results: vec![result.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let done = job(&c, &id).await;
    assert_eq!(done.status(), pb::JobStatus::Succeeded);
    assert_eq!(done.agent_id, "worker");
    assert_eq!(done.output_tail, "built");
    assert_eq!(done.plugin_results, vec![result]);
    // A second report for a finished job is refused.
    let err = c
        .agent(&worker)
        .await
        .report_job_result(pb::ReportJobResultRequest {
            job_id: id.clone(),
            status: pb::JobStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let listed = jobs
        .list_jobs(pb::ListJobsRequest {
            status: pb::JobStatus::Succeeded as i32,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn label_selector_and_plugin_acl_decide_assignment() {
    let c = TestCoordinator::start(|_| {}).await;
    let data = content(1000, 2);
    c.push(
        "secret/tool",
        "1.0.0",
        &data,
        pb::PushPluginHeader {
            allowed_labels: vec![label("team", "red")],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let blue = c.register("blue", &[("team", "blue")], vec![]).await;
    let red = c.register("red", &[("team", "red")], vec![]).await;

    // ACL on the agent paths.
    let mut bc = c.agent(&blue).await;
    let err = bc
        .get_manifest(pb::GetManifestRequest {
            plugin_id: "secret/tool".into(),
            version: "1.0.0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("team=red"), "{err}");
    let err = c
        .download(
            &blue,
            pb::DownloadPluginRequest {
                sha256: ContentId::of_bytes(&data).to_hex(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        bc.list_available_plugins(pb::ListAvailablePluginsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .plugins
            .is_empty()
    );
    let (_, bytes) = c
        .download(
            &red,
            pb::DownloadPluginRequest {
                plugin_id: "secret/tool".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(bytes, data);

    // Assignment: the restricted job never goes to blue; the selector job only to blue.
    let mut jobs = c.jobs(ADMIN).await;
    let restricted = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["x".into()],
            required_plugins: vec![required("secret/tool", "1.0.0", vec![])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let selected = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["y".into()],
            label_selector: vec![label("team", "blue")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let for_blue = fetch(&c, &blue, 0).await;
    assert_eq!(
        for_blue
            .iter()
            .map(|j| j.job_id.clone())
            .collect::<Vec<_>>(),
        vec![selected]
    );
    let for_red = fetch(&c, &red, 0).await;
    assert_eq!(
        for_red.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(),
        vec![restricted]
    );
}

#[tokio::test]
async fn long_poll_returns_when_a_job_arrives() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("poller", &[], vec![]).await;
    let started = Instant::now();
    let poll = {
        let mut client = c.agent(&agent).await;
        tokio::spawn(async move {
            client
                .fetch_job(pb::FetchJobRequest {
                    wait_seconds: 20,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().jobs)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = c
        .jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let jobs = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("long poll answered before its 20 s wait")
        .unwrap()
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job_id, id);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn expired_lease_requeues_and_heartbeat_keeps_it() {
    let c = TestCoordinator::start(|cfg| {
        cfg.jobs.lease_ttl = Seconds(Duration::from_millis(800));
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(200));
        cfg.jobs.max_attempts = 2;
    })
    .await;
    let quiet = c.register("quiet", &[], vec![]).await;
    let other = c.register("other", &[], vec![]).await;
    let mut jobs = c.jobs(ADMIN).await;
    let id = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(fetch(&c, &quiet, 0).await.len(), 1);

    // The quiet agent never heartbeats: the job comes back and another agent gets it.
    let requeued = eventually(Duration::from_secs(10), || async {
        let j = job(&c, &id).await;
        (j.status() == pb::JobStatus::Queued).then_some(j)
    })
    .await
    .expect("lease expired and job re-queued");
    assert!(requeued.error_message.contains("expired"));
    let got = fetch(&c, &other, 0).await;
    assert_eq!(got[0].job_id, id);
    assert_eq!(got[0].attempt, 2);
    let err = c
        .agent(&quiet)
        .await
        .report_job_result(pb::ReportJobResultRequest {
            job_id: id.clone(),
            status: pb::JobStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "stale lease holder is refused"
    );

    // A heart-beating holder keeps its lease across several TTLs.
    let mut oc = c.agent(&other).await;
    for _ in 0..10 {
        let resp = oc
            .heartbeat(pb::HeartbeatRequest {
                running_jobs: vec![id.clone(), "not-mine".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.revoked_jobs, vec!["not-mine".to_string()]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(job(&c, &id).await.status(), pb::JobStatus::Running);

    // Out of attempts: the job fails instead of looping forever.
    let failed = eventually(Duration::from_secs(10), || async {
        let j = job(&c, &id).await;
        (j.status() == pb::JobStatus::Failed).then_some(j)
    })
    .await
    .expect("job failed after max_attempts");
    assert!(
        failed.error_message.contains("max_attempts"),
        "{}",
        failed.error_message
    );
}

#[tokio::test]
async fn restart_keeps_plugins_jobs_agents_and_leases() {
    let mut c = TestCoordinator::start(|_| {}).await;
    let data = content(300_000, 4);
    c.push("keep/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let agent = c.register("survivor", &[("zone", "eu")], vec![]).await;
    let mut jobs = c.jobs(ADMIN).await;
    let mk = || pb::CreateJobRequest {
        commands: vec!["true".into()],
        required_plugins: vec![required("keep/p", "1.0.0", vec![])],
        ..Default::default()
    };
    let leased = jobs.create_job(mk()).await.unwrap().into_inner().job_id;
    assert_eq!(fetch(&c, &agent, 0).await[0].job_id, leased);
    let queued = jobs.create_job(mk()).await.unwrap().into_inner().job_id;

    c.restart().await;

    let (_, bytes) = c
        .download(
            &agent,
            pb::DownloadPluginRequest {
                plugin_id: "keep/p".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .expect("agent token and plugin survive restart");
    assert_eq!(bytes, data);
    assert_eq!(job(&c, &leased).await.status(), pb::JobStatus::Running);
    assert_eq!(job(&c, &queued).await.status(), pb::JobStatus::Queued);
    // The leased job is not handed out twice; the queued one is.
    let got = fetch(&c, &agent, 0).await;
    assert_eq!(
        got.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(),
        vec![queued]
    );
    c.agent(&agent)
        .await
        .report_job_result(pb::ReportJobResultRequest {
            job_id: leased.clone(),
            status: pb::JobStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .expect("result for a lease taken before the restart");
    let agents = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].agent_id, "survivor");
    assert_eq!(agents[0].running_jobs.len(), 1);
}

#[tokio::test]
async fn bad_job_requests_are_invalid_arguments() {
    let c = TestCoordinator::start(|_| {}).await;
    c.push("ok/p", "1.0.0", &content(10, 1), Default::default())
        .await
        .unwrap();
    let mut jobs = c.jobs(ADMIN).await;
    let cases = vec![
        pb::CreateJobRequest::default(),
        pb::CreateJobRequest {
            commands: vec!["x".into()],
            required_plugins: vec![required("Bad", "1.0.0", vec![])],
            ..Default::default()
        },
        pb::CreateJobRequest {
            commands: vec!["x".into()],
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: "ok/p".into(),
                version: "1.0.0".into(),
                stages: vec![42],
                ..Default::default()
            }],
            ..Default::default()
        },
        pb::CreateJobRequest {
            commands: vec!["x".into()],
            required_plugins: vec![
                required("ok/p", "1.0.0", vec![]),
                required("ok/p", "1.0.0", vec![]),
            ],
            ..Default::default()
        },
        pb::CreateJobRequest {
            commands: vec!["x".into()],
            label_selector: vec![label("bad key", "v")],
            ..Default::default()
        },
    ];
    for req in cases {
        let err = jobs.create_job(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err}");
    }
    let err = jobs
        .get_job(pb::GetJobRequest {
            job_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn register_issues_a_mesh_ticket_bound_to_the_peer_and_renews_it() {
    let mut c = TestCoordinator::start(|_| {}).await;
    let peer: PeerId = agent_peer_id("meshy").parse().unwrap();
    let mut client = c.agent(&c.enroll_token).await;
    let resp = client
        .register(signed(pb::RegisterRequest {
            agent_id: "meshy".into(),
            peer_id: peer.to_string(),
            labels: vec![label("team", "red")],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let verifier = TicketVerifier::new(&resp.mesh_public_key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ticket = verifier
        .verify(&resp.mesh_ticket, &peer, now)
        .expect("valid ticket for our peer");
    assert_eq!(ticket.agent_id, "meshy");
    assert_eq!(ticket.labels.get("team").map(String::as_str), Some("red"));
    assert!(
        verifier
            .verify(&resp.mesh_ticket, &PeerId::random(), now)
            .is_err(),
        "bound to the peer"
    );
    // Fresh ticket: a heartbeat does not renew it yet.
    let hb = c
        .agent(&resp.agent_token)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(hb.mesh_ticket.is_empty());
    // A bad peer id is refused.
    let err = client
        .register(signed(pb::RegisterRequest {
            agent_id: "bad-peer".into(),
            peer_id: "not-a-peer-id".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // After a restart the coordinator does not know the ticket's age: it renews, with
    // the same key (mesh.key is persisted).
    c.restart().await;
    let hb = c
        .agent(&resp.agent_token)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .unwrap()
        .into_inner();
    verifier
        .verify(&hb.mesh_ticket, &peer, now)
        .expect("renewed ticket signed by the same key");
}

/// A runnable plugin: a shell script that exits 0, padded with `seed`'s bytes.
fn script(seed: u8) -> Vec<u8> {
    let mut p = b"#!/bin/sh\nexit 0\n".to_vec();
    p.extend(content(50_000, seed));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_selectors_resolve_among_enabled_versions_when_the_job_is_created() {
    let c = TestCoordinator::start(|_| {}).await;
    for (i, v) in ["1.0.0", "1.2.0", "1.2.7", "1.3.0-rc.1", "1.4.0", "2.0.0"]
        .into_iter()
        .enumerate()
    {
        c.push("sel/p", v, &script(i as u8), Default::default())
            .await
            .unwrap();
    }
    c.plugins(ADMIN)
        .await
        .set_plugin_enabled(pb::SetPluginEnabledRequest {
            plugin_id: "sel/p".into(),
            version: "1.4.0".into(),
            enabled: false,
        })
        .await
        .unwrap();
    let create = |version: &'static str| {
        let c = &c;
        async move {
            c.jobs(ADMIN)
                .await
                .create_job(pb::CreateJobRequest {
                    commands: vec!["true".into()],
                    required_plugins: vec![required("sel/p", version, vec![])],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().job_id)
        }
    };
    // Resolved to the highest enabled match; pre-releases only when the range names one.
    for (selector, resolved) in [
        ("^1.0", "1.2.7"),
        ("~1.2.0", "1.2.7"),
        (">=1.0.0, <1.2.5", "1.2.0"),
        ("latest", "2.0.0"),
        ("^1.3.0-rc.1", "1.3.0-rc.1"),
        ("1.2.0", "1.2.0"),
    ] {
        let id = create(selector).await.unwrap();
        let rp = &job(&c, &id).await.required_plugins[0];
        assert_eq!(rp.version, resolved, "{selector}");
        let requested = if selector == "1.2.0" { "" } else { selector };
        assert_eq!(rp.requested, requested, "{selector}");
    }
    // Nothing enabled matches: a clear refusal naming what is enabled.
    let err = create("^1.4").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("no enabled version of sel/p matches ^1.4")
            && err.message().contains("2.0.0, 1.3.0-rc.1, 1.2.7"),
        "{}",
        err.message()
    );
    let err = create("1.2").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("range"), "{}", err.message());
    let err = c
        .jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![required("sel/none", "latest", vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // The version is fixed when the job is created: a newer push does not move it, and
    // the agent runs what was resolved.
    let id = create("^1").await.unwrap();
    c.push("sel/p", "1.9.0", &script(9), Default::default())
        .await
        .unwrap();
    assert_eq!(job(&c, &id).await.required_plugins[0].version, "1.2.7");
    let _agent =
        arcade_tests::agents::TestAgent::start(&c.url, arcade_tests::ENROLL, "runner", |_, _| {})
            .await;
    let done = arcade_tests::wait_job(&c, &id).await;
    assert_eq!(
        done.status(),
        pb::JobStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert!(
        !done.plugin_results.is_empty() && done.plugin_results.iter().all(|r| r.version == "1.2.7"),
        "{:?}",
        done.plugin_results
    );
}
