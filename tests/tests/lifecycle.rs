//! The job lifecycle a fleet needs, end to end through the real `arcadectl` binary, a
//! coordinator and a real agent: the command after `--` runs exactly as typed, queued
//! and running jobs are cancelled (the running one's processes are killed), a job no
//! agent could run says so, finished jobs are swept after `jobs.retention`, and a
//! removed agent's jobs go back to the queue and its token stops working.

use std::process::Output;
use std::time::Duration;

use arcade_p2p::settings::Seconds;
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::process::{arcadectl, stdout_ok};
use arcade_tests::{
    ADMIN, ENROLL, TestCoordinator, command_job, eventually, fetch_one, finished_job,
};
use tonic::Code;

fn ctl(c: &TestCoordinator, args: &[&str]) -> Output {
    arcadectl(&c.url, args)
}

fn ok(out: Output) -> String {
    stdout_ok(&out).trim().to_owned()
}

async fn status(c: &TestCoordinator, id: &str) -> pb::JobDetail {
    c.jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie is reaped by its parent shortly.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_commands_cancel_and_unrunnable_jobs_through_arcadectl_and_a_real_agent() {
    let c = TestCoordinator::start(|c| {
        c.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
        c.jobs.lease_ttl = Seconds::secs(5);
    })
    .await;
    let mut agent = TestAgent::start(&c.url, ENROLL, "worker-1", |a, _| {
        a.labels.insert("team".into(), "red".into());
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("f");

    // The command after `--` runs exactly as typed: one `sh -c` argument with `>>`.
    let script = format!("echo 'a  b' >> {}", out_file.display());
    let id = ok(ctl(&c, &["job", "create", "--", "sh", "-c", &script]));
    ok(ctl(&c, &["job", "wait", &id, "--timeout", "60"]));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "a  b\n");

    // A job no registered agent could ever run is reported as such, then cancelled
    // while queued: it is never leased.
    let id = ok(ctl(
        &c,
        &["job", "create", "--label", "team=blue", "--", "true"],
    ));
    let shown = ok(ctl(&c, &["job", "get", &id]));
    assert!(shown.contains("team=blue"), "{shown}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(ctl(&c, &["job", "get", &id, "--json"]))).unwrap();
    assert!(
        json["waiting_reason"]
            .as_str()
            .unwrap()
            .contains("no registered agent carries the label team=blue"),
        "{json}"
    );
    let said = ok(ctl(&c, &["job", "cancel", &id]));
    assert!(said.contains("cancelled"), "{said}");
    let job = status(&c, &id).await;
    assert_eq!(job.status(), pb::JobStatus::Cancelled);
    assert_eq!(job.attempts, 0, "a cancelled queued job is never leased");
    let waited = ctl(&c, &["job", "wait", &id, "--timeout", "5"]);
    assert!(!waited.status.success());
    assert!(String::from_utf8_lossy(&waited.stderr).contains("cancelled"));

    // A running job: its agent learns of the cancel through its heartbeat and kills
    // the whole process group; the job ends `cancelled`.
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; sleep 600 & wait", pid_file.display());
    let id = ok(ctl(&c, &["job", "create", "--", "sh", "-c", &script]));
    let pid: i32 = eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
    .expect("the job started");
    assert!(alive(pid));
    let said = ok(ctl(&c, &["job", "cancel", &id]));
    assert!(said.contains("cancel requested"), "{said}");
    let job = finished_job(&c, &id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(job.status(), pb::JobStatus::Cancelled, "{job:?}");
    assert!(job.error_message.contains("cancelled"), "{job:?}");
    let gone = eventually(Duration::from_secs(10), || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the cancelled job's shell {pid} still runs");
    // Cancelling a finished job changes nothing.
    let said = ok(ctl(&c, &["job", "cancel", &id]));
    assert!(said.contains("already finished"), "{said}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_swept_after_the_retention() {
    let c = TestCoordinator::start(|c| c.jobs.retention = Seconds::secs(1)).await;
    let token = c.register("r1", &[], vec![]).await;
    let done = command_job(&c, "true").await;
    let leased = fetch_one(&c, &token, "r1", 5).await;
    assert_eq!(leased[0].job_id, done);
    c.agent(&token)
        .await
        .report_job_result(pb::ReportJobResultRequest {
            agent_id: "r1".into(),
            job_id: done.clone(),
            status: pb::JobStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let queued = arcade_tests::create_job_with(&c, "true", &[("nobody", "x")]).await;
    let swept = eventually(Duration::from_secs(15), || async {
        let r = c
            .jobs(ADMIN)
            .await
            .get_job(pb::GetJobRequest {
                job_id: done.clone(),
            })
            .await;
        matches!(r, Err(e) if e.code() == Code::NotFound).then_some(())
    })
    .await;
    assert!(swept.is_some(), "the finished job outlived jobs.retention");
    // Queued jobs are not finished: they stay.
    assert_eq!(status(&c, &queued).await.status(), pb::JobStatus::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_agent_loses_its_token_and_its_jobs_are_requeued() {
    let c = TestCoordinator::start(|_| {}).await;
    let token = c.register("doomed", &[], vec![]).await;
    let mut agent = c.agent(&token).await;
    let id = command_job(&c, "true").await;
    assert_eq!(fetch_one(&c, &token, "doomed", 5).await.len(), 1);
    assert_eq!(status(&c, &id).await.status(), pb::JobStatus::Running);

    let said = ok(ctl(&c, &["agent", "remove", "doomed"]));
    assert!(
        said.contains("1 job(s) re-queued") && said.contains(&id),
        "{said}"
    );
    let listed = ok(ctl(&c, &["agent", "list", "--json"]));
    assert!(!listed.contains("doomed"), "{listed}");
    let err = agent
        .heartbeat(pb::HeartbeatRequest {
            running_jobs: vec![id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = agent
        .report_job_result(pb::ReportJobResultRequest {
            agent_id: "doomed".into(),
            job_id: id.clone(),
            status: pb::JobStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let job = status(&c, &id).await;
    assert_eq!(job.status(), pb::JobStatus::Queued);
    // Another agent gets it.
    let other = c.register("other", &[], vec![]).await;
    let got = fetch_one(&c, &other, "other", 5).await;
    assert_eq!(got[0].job_id, id);
    assert_eq!(got[0].attempt, 2);
    let missing = ctl(&c, &["agent", "remove", "doomed"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not registered"));
}
