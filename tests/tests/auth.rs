//! Authentication and access: enrollment, per-agent and admin tokens.

use arcade_proto::v1 as pb;
use arcade_tests::{ADMIN, ENROLL, TestCoordinator};
use tonic::Code;

#[tokio::test]
async fn every_token_kind_is_checked() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("a1", &[], vec![]).await;

    // Admin calls: no token, wrong token, agent token, enrollment token.
    let mut raw = arcade_proto::v1::plugin_admin_client::PluginAdminClient::new(c.channel().await);
    let err = raw
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization"));
    for token in ["wrong-token", agent.as_str(), ENROLL] {
        let err = c
            .plugins(token)
            .await
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}");
        let err = c
            .jobs(token)
            .await
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = c
            .fleet(token)
            .await
            .list_agents(pb::ListAgentsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    // Register needs the enrollment token.
    for token in ["wrong-token", ADMIN, agent.as_str()] {
        let err = c
            .agent(token)
            .await
            .register(pb::RegisterRequest {
                agent_id: "intruder".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}");
    }

    // Agent calls need the agent's own token.
    for token in ["wrong-token", ADMIN, ENROLL] {
        let err = c
            .agent(token)
            .await
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}");
    }
    let err = c
        .agent(&agent)
        .await
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "someone-else".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Re-registering replaces the token: the old one stops working.
    let fresh = c.register("a1", &[], vec![]).await;
    assert_ne!(fresh, agent);
    let err = c
        .agent(&agent)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    c.agent(&fresh)
        .await
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn register_validates_its_input() {
    let c = TestCoordinator::start(|_| {}).await;
    for id in ["", "bad id", "../x", &"x".repeat(200)] {
        let err = c.register_with(id, &[], vec![], "").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
    }
    let bad_installed = pb::InstalledPlugin {
        plugin_id: "ok/p".into(),
        version: "1.0.0".into(),
        sha256: "not-a-sha".into(),
    };
    let err = c
        .register_with("a2", &[], vec![bad_installed], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .register_with("a3", &[("bad key", "v")], vec![], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn health_service_reports_serving() {
    let c = TestCoordinator::start(|_| {}).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "arcade.v1.Agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
