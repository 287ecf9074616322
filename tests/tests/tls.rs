//! TLS on the coordinator's gRPC listener, end to end over TCP: a real agent runs a job
//! over `https://` with mutual TLS; plaintext, an untrusted CA and a missing client
//! certificate are refused; a renewed certificate is picked up without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arcade_proto::ClientTls;
use arcade_proto::v1 as pb;
use arcade_proto::v1::fleet_client::FleetClient;
use arcade_proto::v1::jobs_client::JobsClient;
use arcade_tests::agents::TestAgent;
use arcade_tests::{ADMIN, Bearer, ENROLL, TestCoordinator, eventually};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tonic::service::interceptor::InterceptedService;

/// A CA that signs server and client certificates.
struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    /// (cert PEM, key PEM) for `name`, for a server or a client.
    fn leaf(&self, name: &str, server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn list_agents(url: &str, tls: &ClientTls) -> Result<usize, String> {
    let channel = arcade_proto::client_endpoint_with(url, tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut fleet = FleetClient::new(InterceptedService::new(
        channel,
        Bearer::new(ADMIN).unwrap(),
    ));
    fleet
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map(|r| r.into_inner().agents.len())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_work_over_mutual_tls_and_renewed_certificates_need_no_restart() {
    let files = tempfile::tempdir().unwrap();
    let (ca, client_ca, other_ca) = (Ca::new(), Ca::new(), Ca::new());
    let (cert, key) = ca.leaf("localhost", true);
    let cert_file = write(files.path(), "server.pem", &cert);
    let key_file = write(files.path(), "server.key", &key);
    let ca_file = write(files.path(), "ca.pem", &ca.pem);
    let client_ca_file = write(files.path(), "client-ca.pem", &client_ca.pem);
    let (ccert, ckey) = client_ca.leaf("agent", false);
    let client_cert = write(files.path(), "client.pem", &ccert);
    let client_key = write(files.path(), "client.key", &ckey);
    let (rogue_cert, rogue_key) = other_ca.leaf("agent", false);

    let c = TestCoordinator::start(|cfg| {
        cfg.tls.cert = cert_file.clone();
        cfg.tls.key = key_file.clone();
        cfg.tls.client_ca = client_ca_file.clone();
        cfg.jobs.heartbeat_interval = arcade_p2p::settings::Seconds(Duration::from_millis(500));
    })
    .await;
    let url = c.url.clone();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let good = ClientTls {
        ca: ca_file.clone(),
        cert: client_cert.clone(),
        key: client_key.clone(),
        insecure: false,
    };
    assert_eq!(list_agents(&url, &good).await, Ok(0));

    // Refused: plaintext, no client certificate, a client certificate of another CA, a
    // server the client does not trust.
    let port = url.rsplit(':').next().unwrap();
    let plain = list_agents(&format!("http://127.0.0.1:{port}"), &ClientTls::default()).await;
    assert!(plain.is_err(), "plaintext to a TLS listener: {plain:?}");
    let no_cert = ClientTls {
        ca: ca_file.clone(),
        ..Default::default()
    };
    assert!(
        list_agents(&url, &no_cert).await.is_err(),
        "mTLS without a client certificate"
    );
    let rogue = ClientTls {
        ca: ca_file.clone(),
        cert: write(files.path(), "rogue.pem", &rogue_cert),
        key: write(files.path(), "rogue.key", &rogue_key),
        insecure: false,
    };
    assert!(
        list_agents(&url, &rogue).await.is_err(),
        "a client certificate of another CA"
    );
    let untrusting = ClientTls {
        ca: write(files.path(), "other-ca.pem", &other_ca.pem),
        ..good.clone()
    };
    assert!(
        list_agents(&url, &untrusting).await.is_err(),
        "a server signed by an untrusted CA"
    );

    // A real agent registers, heartbeats and runs a job over mTLS.
    let mut agent = TestAgent::start(&url, ENROLL, "tls-agent", |cfg, _| {
        cfg.tls.ca = ca_file.clone();
        cfg.tls.cert = client_cert.clone();
        cfg.tls.key = client_key.clone();
        cfg.mesh.enabled = false;
    })
    .await;
    let channel = arcade_proto::client_endpoint_with(&url, &good)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut jobs = JobsClient::new(InterceptedService::new(
        channel,
        Bearer::new(ADMIN).unwrap(),
    ));
    let id = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let done = eventually(Duration::from_secs(60), || {
        let (mut jobs, id) = (jobs.clone(), id.clone());
        async move {
            let j = jobs
                .get_job(pb::GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner()
                .job?;
            (j.status() == pb::JobStatus::Succeeded).then_some(())
        }
    })
    .await;
    assert!(done.is_some(), "the job did not succeed over TLS");

    // Renewal: a certificate from another CA replaces the files; new connections get
    // it (file change, no SIGHUP, no restart), so only clients trusting that CA connect.
    let (new_cert, new_key) = other_ca.leaf("localhost", true);
    std::fs::write(&key_file, new_key).unwrap();
    std::fs::write(&cert_file, new_cert).unwrap();
    let renewed = ClientTls {
        ca: write(files.path(), "other-ca-2.pem", &other_ca.pem),
        ..good.clone()
    };
    let reloaded = eventually(Duration::from_secs(15), || {
        let (url, renewed) = (url.clone(), renewed.clone());
        async move { list_agents(&url, &renewed).await.ok() }
    })
    .await;
    assert_eq!(reloaded, Some(1), "the renewed certificate was not served");
    assert!(
        list_agents(&url, &good).await.is_err(),
        "the old CA still verifies a new connection"
    );
    agent.stop().await;
}
