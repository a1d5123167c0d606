//! Entra ID credentials towards the instances: every credential type
//! against keyless (`disableLocalAuth`) simulated instances and the
//! simulated identity host, one fetch for many requests, background
//! refresh, the token endpoint down at start and during traffic, one
//! refresh and replay after a backend 401, and no token in any output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_lb::config::Config;
use aoai_lb::credential::AzureEnv;
use aoai_lb::secret::Secret;
use aoai_lb::server::ServeOptions;
use aoai_sim::identity::DEFAULT_IDENTITY_HEADER;
use aoai_sim::{Fault, IdentityConfig, IdentityHandle, InstanceConfig, SimHandle};
use common::*;
use http::{Method, StatusCode};

const MI: &str = r#"{"type":"managed_identity"}"#;

async fn identity() -> IdentityHandle {
    aoai_sim::start_identity(IdentityConfig::default())
        .await
        .expect("identity host starts")
}

/// Keyless instances that only the gateway's identity may call.
async fn keyless(names: &[&str], principal: &str) -> Vec<SimHandle> {
    start_sims(
        names
            .iter()
            .map(|n| {
                InstanceConfig::new(*n)
                    .local_auth_disabled(true)
                    .entra_principals(&[principal])
            })
            .collect(),
    )
    .await
}

fn instance(sim: &SimHandle, auth: &str) -> serde_json::Value {
    serde_json::json!({
        "name": sim.name(),
        "url": sim.url(),
        "auth": serde_json::from_str::<serde_json::Value>(auth).unwrap(),
    })
}

fn doc(instances: Vec<serde_json::Value>) -> String {
    serde_json::json!({ "instances": instances }).to_string()
}

fn aca_env(id: &IdentityHandle) -> Vec<(String, String)> {
    vec![
        ("IDENTITY_ENDPOINT".into(), id.identity_endpoint()),
        ("IDENTITY_HEADER".into(), DEFAULT_IDENTITY_HEADER.into()),
    ]
}

async fn start_with_env(config: &str, env: Vec<(String, String)>) -> TestGateway {
    start_gateway_with(config, Some(CLIENT_KEY), |o| {
        o.azure_env = AzureEnv::from_pairs(env);
    })
    .await
}

async fn chat(gw: &TestGateway) -> (StatusCode, bytes::Bytes) {
    let (s, _, b) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    (s, b)
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

#[tokio::test]
async fn managed_identity_through_the_identity_endpoint_reaches_a_keyless_instance() {
    let id = identity().await;
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let sims = keyless(&["mi"], &principal).await;
    let gw = start_with_env(&doc(vec![instance(&sims[0], MI)]), aca_env(&id)).await;
    let (s, body) = chat(&gw).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(e.header("authorization"), Some("Bearer ***"));
    assert_eq!(e.header("api-key"), None);
    assert_eq!(id.counts().msi, 1);
    assert_eq!(id.counts().imds, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn managed_identity_falls_back_to_imds_with_a_user_assigned_client_id() {
    let id = identity().await;
    id.add_user_assigned_identity("uai-7");
    let sims = keyless(&["imds"], &IdentityHandle::object_id_of("uai-7")).await;
    let env = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST".into(), id.url())];
    let gw = start_with_env(
        &doc(vec![instance(
            &sims[0],
            r#"{"type":"managed_identity","client_id":"uai-7"}"#,
        )]),
        env,
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!((id.counts().imds, id.counts().msi), (1, 0));
    gw.shutdown().await;
}

#[tokio::test]
async fn client_secret_credential_fetches_from_the_authority() {
    let id = identity().await;
    id.add_client_secret("app-cs", "cs-secret-value-41");
    let sims = keyless(&["cs"], &IdentityHandle::object_id_of("app-cs")).await;
    let auth = format!(
        r#"{{"type":"client_secret","tenant_id":"{}","client_id":"app-cs","client_secret":"cs-secret-value-41"}}"#,
        id.tenant_id()
    );
    let env = vec![("AZURE_AUTHORITY_HOST".into(), format!("{}/", id.url()))];
    let gw = start_with_env(&doc(vec![instance(&sims[0], &auth)]), env).await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(id.counts().aad, 1);
    let admin = gw.admin_json("/admin/backends").await.to_string();
    assert!(!admin.contains("cs-secret-value-41"), "{admin}");
    assert!(admin.contains("client_secret:app-cs"), "{admin}");
    gw.shutdown().await;
}

const CERT_PEM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/entra-test-cert.pem"
);

#[tokio::test]
async fn client_certificate_credential_signs_an_assertion_the_authority_accepts() {
    let id = identity().await;
    let key =
        aoai_lb::client_cert::CertificateKey::from_pem(&std::fs::read(CERT_PEM).unwrap()).unwrap();
    // First the app registration holds another certificate: the token
    // endpoint refuses the assertion (AADSTS700027), so the instance stays
    // out of rotation and nothing is sent to it.
    id.add_client_certificate("app-cert", key.public_key_der().to_vec(), "not-this-cert");
    let sims = keyless(&["cert"], &IdentityHandle::object_id_of("app-cert")).await;
    let auth = format!(
        r#"{{"type":"client_certificate","tenant_id":"{}","client_id":"app-cert","certificate_path":"{CERT_PEM}"}}"#,
        id.tenant_id()
    );
    let env = vec![("AZURE_AUTHORITY_HOST".into(), id.url())];
    let gw = start_with_env(&doc(vec![instance(&sims[0], &auth)]), env).await;
    eventually(
        "the refused assertion is reported",
        Duration::from_secs(10),
        async || {
            gw.admin_json("/admin/backends")
                .await
                .to_string()
                .contains("700027")
        },
    )
    .await;
    assert_ne!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(sims[0].request_count(), 0);
    // The right certificate uploaded: the next retry gets a token.
    id.add_client_certificate(
        "app-cert",
        key.public_key_der().to_vec(),
        key.thumbprint_s256(),
    );
    eventually(
        "a token with the certificate",
        Duration::from_secs(20),
        async || chat(&gw).await.0 == StatusCode::OK,
    )
    .await;
    let admin = gw.admin_json("/admin/backends").await.to_string();
    assert!(admin.contains("client_certificate:app-cert"), "{admin}");
    assert!(!admin.contains("PRIVATE KEY"), "{admin}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_certificate_file_without_a_key_stops_start_up_naming_the_field() {
    let sims = keyless(&["cert"], "x").await;
    let dir = std::env::temp_dir().join(format!("aoai-lb-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_only = dir.join("cert-only.pem");
    let pem = std::fs::read_to_string(CERT_PEM).unwrap();
    let cert: String = pem
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .collect();
    std::fs::write(&cert_only, cert).unwrap();
    let auth = format!(
        r#"{{"type":"client_certificate","tenant_id":"t","client_id":"a","certificate_path":"{}"}}"#,
        cert_only.display()
    );
    let config = Arc::new(Config::from_json(&doc(vec![instance(&sims[0], &auth)])).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.azure_env = AzureEnv::default();
    let e = aoai_lb::server::spawn(config, opts).await.err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("instances[0].auth: certificate_path")
            && text.contains("no unencrypted PEM private key"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn workload_identity_rereads_the_token_file_on_every_refresh() {
    let id = identity().await;
    id.set_token_lifetime(Duration::from_secs(2));
    let dir = std::env::temp_dir().join(format!("aoai-lb-wi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("azure-identity-token");
    std::fs::write(&file, "projected-1\n").unwrap();
    id.set_federated_assertion("wi-app", "projected-1");
    let sims = keyless(&["wi"], &IdentityHandle::object_id_of("wi-app")).await;
    let env = vec![
        ("AZURE_AUTHORITY_HOST".into(), id.url()),
        ("AZURE_TENANT_ID".into(), id.tenant_id().to_owned()),
        ("AZURE_CLIENT_ID".into(), "wi-app".into()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".into(),
            file.display().to_string(),
        ),
    ];
    let gw = start_with_env(
        &doc(vec![instance(&sims[0], r#"{"type":"workload_identity"}"#)]),
        env,
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    // The kubelet rotates the projected token; the old one is refused.
    std::fs::write(&file, "projected-2\n").unwrap();
    id.set_federated_assertion("wi-app", "projected-2");
    let before = id.counts().issued;
    eventually(
        "a refresh with the new file",
        Duration::from_secs(10),
        async || id.counts().issued > before,
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    let admin = gw.admin_json("/admin/backends").await;
    assert_eq!(admin["backends"][0]["credential"]["state"], "ok", "{admin}");
    gw.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_credential_missing_its_variables_stops_start_up_naming_the_field() {
    let sims = keyless(&["wi"], "x").await;
    let config = Arc::new(
        Config::from_json(&doc(vec![instance(
            &sims[0],
            r#"{"type":"workload_identity"}"#,
        )]))
        .unwrap(),
    );
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.azure_env = AzureEnv::default();
    let e = aoai_lb::server::spawn(config, opts).await.err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("instances[0].auth: AZURE_FEDERATED_TOKEN_FILE"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_fetch_serves_thousands_of_requests_across_instances() {
    let id = identity().await;
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let sims = keyless(&["a", "b"], &principal).await;
    let gw = start_with_env(
        &doc(vec![instance(&sims[0], MI), instance(&sims[1], MI)]),
        aca_env(&id),
    )
    .await;
    const REQUESTS: usize = 2_000;
    const WORKERS: usize = 16;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let started = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = client();
                let mut ok = 0;
                for _ in 0..REQUESTS / WORKERS {
                    let (s, _, _) =
                        send_with(&c, Method::POST, &url, &auth(), chat_body(false)).await;
                    ok += usize::from(s == StatusCode::OK);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    println!(
        "FIGURE entra_one_fetch requests={REQUESTS} fetches={} elapsed_ms={}",
        id.counts().issued,
        started.elapsed().as_millis()
    );
    assert_eq!(ok, REQUESTS);
    assert_eq!(id.counts().msi, 1, "{:?}", id.counts());
    assert!(sims[0].request_count() > 0 && sims[1].request_count() > 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_before_expiry_while_no_request_waits_for_the_fetch() {
    let id = identity().await;
    id.set_token_lifetime(Duration::from_secs(3));
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let sims = keyless(&["a"], &principal).await;
    let gw = start_with_env(&doc(vec![instance(&sims[0], MI)]), aca_env(&id)).await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    // From now on every fetch takes 700 ms: a request that waited for one
    // would take at least that long.
    id.set_delay(Duration::from_millis(700));
    let c = client();
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let run = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while run.elapsed() < Duration::from_secs(7) && n < 5_000 {
        let t = Instant::now();
        let (s, _, b) = send_with(&c, Method::POST, &url, &auth(), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        slowest = slowest.max(t.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fetches = id.counts().issued;
    println!(
        "FIGURE entra_refresh requests={n} fetches={fetches} slowest_ms={}",
        slowest.as_millis()
    );
    // 3 s tokens refresh at about half-life: 3 or more fetches in 7 s.
    assert!(fetches >= 3, "{fetches}");
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited: {slowest:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_at_start_leaves_the_instance_out_until_a_token_arrives() {
    let id = identity().await;
    id.fail(503, None);
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let keyless_sims = keyless(&["mi"], &principal).await;
    let keyed = sims(1).await;
    let mut key_instance = instance(&keyed[0], r#"{"type":"api_key"}"#);
    key_instance["api_key"] = serde_json::Value::from(keyed[0].config().api_key.as_str());
    key_instance["priority"] = serde_json::Value::from(2);
    let gw = start_with_env(
        &doc(vec![instance(&keyless_sims[0], MI), key_instance]),
        aca_env(&id),
    )
    .await;
    // The gateway started; the keyless instance waits for a token, the
    // keyed one (lower priority) serves meanwhile.
    for _ in 0..5 {
        assert_eq!(chat(&gw).await.0, StatusCode::OK);
    }
    assert_eq!(keyless_sims[0].request_count(), 0);
    let admin = gw.admin_json("/admin/backends").await;
    let why = admin["backends"][0]["unavailable"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("no valid Entra ID token") && why.contains("HTTP 503"),
        "{admin}"
    );
    assert_eq!(admin["backends"][0]["credential"]["state"], "failing");
    assert!(admin["backends"][1]["unavailable"].is_null());
    let failed = id.counts().msi;
    assert!(failed <= 6, "backoff, not a tight loop: {failed} fetches");

    id.recover();
    eventually(
        "the instance has a token",
        Duration::from_secs(10),
        async || gw.admin_json("/admin/backends").await["backends"][0]["unavailable"].is_null(),
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(keyless_sims[0].request_count(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_during_traffic_keeps_the_valid_token_then_fails_over() {
    let id = identity().await;
    id.set_token_lifetime(Duration::from_secs(3));
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let keyless_sims = keyless(&["mi"], &principal).await;
    let keyed = sims(1).await;
    let mut key_instance = instance(&keyed[0], r#"{"type":"api_key"}"#);
    key_instance["api_key"] = serde_json::Value::from(keyed[0].config().api_key.as_str());
    key_instance["priority"] = serde_json::Value::from(2);
    let gw = start_with_env(
        &doc(vec![instance(&keyless_sims[0], MI), key_instance]),
        aca_env(&id),
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(keyless_sims[0].request_count(), 1);
    id.fail(503, None);
    // Until the token expires (3 s), the keyless instance keeps serving.
    let t0 = Instant::now();
    let mut on_keyless_while_valid = 0;
    while t0.elapsed() < Duration::from_millis(1200) {
        assert_eq!(chat(&gw).await.0, StatusCode::OK);
        on_keyless_while_valid = keyless_sims[0].request_count();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(on_keyless_while_valid > 5, "{on_keyless_while_valid}");
    // Past expiry: every request is still answered, by the keyed instance.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let keyed_before = keyed[0].request_count();
    for _ in 0..5 {
        assert_eq!(chat(&gw).await.0, StatusCode::OK);
    }
    assert_eq!(keyed[0].request_count(), keyed_before + 5);
    let (_, _, metrics) = send(
        Method::GET,
        &format!("{}/metrics", gw.admin_url()),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains(
            "aoai_lb_token_refresh_failures_total{credential=\"managed_identity:system\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("aoai_lb_token_refreshes_total{credential=\"managed_identity:system\"}")
    );
    assert!(
        metrics
            .contains("aoai_lb_token_expires_in_seconds{credential=\"managed_identity:system\"}")
    );
    assert!(!metrics.contains("eyJ"));
    id.recover();
    eventually(
        "back on the keyless instance",
        Duration::from_secs(10),
        async || gw.admin_json("/admin/backends").await["backends"][0]["unavailable"].is_null(),
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_401_to_a_stale_token_is_recovered_by_one_refresh_and_one_replay() {
    let id = identity().await;
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let sims = keyless(&["a", "b"], &principal).await;
    let gw = start_with_env(
        &doc(vec![instance(&sims[0], MI), {
            let mut b = instance(&sims[1], MI);
            b["priority"] = serde_json::Value::from(2);
            b
        }]),
        aca_env(&id),
    )
    .await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(id.counts().issued, 1);
    // The instance revokes the token once (as after a key rotation or a
    // role change): one refresh, one replay on the same instance.
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 401,
        body: None,
        retry_after_ms: None,
    });
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(id.counts().issued, 2);
    assert_eq!(sims[0].request_count(), 3);
    assert_eq!(sims[1].request_count(), 0);
    let j = sims[0].journal();
    assert_eq!(j[1].status, 401);
    assert_eq!(j[2].status, 200);

    // A second 401 right after (the forced refresh is rate-limited): no
    // new fetch, the request fails over.
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 401,
        body: None,
        retry_after_ms: None,
    });
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    assert_eq!(id.counts().issued, 2, "no refresh storm");
    assert_eq!(sims[1].request_count(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_401_again_after_the_replay_fails_over_to_the_next_instance() {
    let id = identity().await;
    let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
    let sims = keyless(&["a", "b"], &principal).await;
    let mut b = instance(&sims[1], MI);
    b["priority"] = serde_json::Value::from(2);
    let gw = start_with_env(&doc(vec![instance(&sims[0], MI), b]), aca_env(&id)).await;
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    sims[0].inject(Fault::Fail {
        count: Some(2),
        status: 401,
        body: None,
        retry_after_ms: None,
    });
    assert_eq!(chat(&gw).await.0, StatusCode::OK);
    // First instance: the 401, the replay's 401; then the second instance.
    assert_eq!(sims[0].request_count(), 3);
    assert_eq!(sims[1].request_count(), 1);
    assert_eq!(id.counts().issued, 2);
    gw.shutdown().await;
}

#[test]
fn no_token_reaches_logs_metrics_or_admin_output_of_the_binary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (id, sims) = rt.block_on(async {
        let id = identity().await;
        let principal = IdentityHandle::object_id_of(aoai_sim::identity::SYSTEM_IDENTITY_CLIENT_ID);
        let sims = keyless(&["a"], &principal).await;
        (id, sims)
    });
    let config = doc(vec![instance(&sims[0], MI)]);
    let endpoint = id.identity_endpoint();
    let mut bin = spawn_binary(
        &[],
        &[
            ("OPENAI_INSTANCES", &config),
            ("API_KEY", CLIENT_KEY),
            ("HOST", "127.0.0.1"),
            ("PORT", "0"),
            ("ADMIN_PORT", "0"),
            ("LOG_LEVEL", "debug"),
            ("IDENTITY_ENDPOINT", &endpoint),
            ("IDENTITY_HEADER", DEFAULT_IDENTITY_HEADER),
        ],
    );
    let (addr, admin) = bin.wait_listening(Duration::from_secs(30));
    let outputs = rt.block_on(async {
        let url = format!("http://{addr}{}", chat_path("gpt-4o"));
        let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK);
        // A 401 from the instance and a failed refresh leave traces too.
        id.fail(500, None);
        sims[0].inject(Fault::Fail {
            count: Some(2),
            status: 401,
            body: None,
            retry_after_ms: None,
        });
        let (_, _, err_body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
        let get = |p: &str| {
            let u = format!("http://{admin}{p}");
            async move { send(Method::GET, &u, &[] as &[(&str, &str)], "").await.2 }
        };
        vec![
            err_body,
            get("/metrics").await,
            get("/admin/backends").await,
        ]
    });
    bin.wait_for_line(Duration::from_secs(10), |l| {
        l.contains("Entra ID token acquired")
    })
    .expect("the acquisition is logged");
    bin.signal("TERM");
    let _ = bin.wait_exit(Duration::from_secs(30));
    let mut everything: Vec<String> = bin.all_text();
    everything.extend(
        outputs
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    );
    for text in &everything {
        assert!(!text.contains("eyJ"), "a token leaked: {text}");
        assert!(
            !text.contains(DEFAULT_IDENTITY_HEADER),
            "the identity header leaked: {text}"
        );
    }
}
