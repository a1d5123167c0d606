//! Rate-limit-aware routing against the real gateway and in-process
//! aoai-sim instances with Azure's admission model (rolling 60 s token
//! reservations, RPM / 6 per 10 s) or a provisioned (PTU) deployment's
//! utilization bucket. The gateway and the simulators share
//! one manual time line, so every window is exact and nothing sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_lb::backend::Clock;
use aoai_sim::{SimClock, SimHandle};
use common::*;
use http::{Method, StatusCode};

/// One time line for the gateway and the simulators.
#[derive(Clone)]
struct Time {
    gw: Clock,
    sim: SimClock,
}

impl Time {
    fn new() -> Self {
        Self {
            gw: Clock::manual(1_795_996_740_000),
            sim: SimClock::manual(),
        }
    }

    fn advance(&self, ms: u64) {
        self.gw.advance(ms);
        self.sim.advance(Duration::from_millis(ms));
    }
}

/// Simulators named `{prefix}0`.. with `(rpm, tpm)` each (0 =
/// unlimited), on `time`. Metrics are process-wide, so every test names
/// its instances differently.
async fn limited_sims(prefix: &str, time: &Time, limits: &[(u32, u32)]) -> Vec<SimHandle> {
    start_sims(
        limits
            .iter()
            .enumerate()
            .map(|(i, &(rpm, tpm))| {
                aoai_sim::InstanceConfig::new(format!("{prefix}{i}"))
                    .rate_limit(rpm, tpm)
                    .clock(time.sim.clone())
            })
            .collect(),
    )
    .await
}

async fn start(doc: &str, time: &Time) -> TestGateway {
    start_gateway_with(doc, Some(CLIENT_KEY), |o| o.clock = time.gw.clone()).await
}

/// A chat body reserving about `max_tokens` (plus a few prompt tokens).
fn body(max_tokens: u64) -> String {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    })
    .to_string()
}

async fn chat(gw: &TestGateway, max_tokens: u64) -> StatusCode {
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    send(Method::POST, &url, &auth(), body(max_tokens)).await.0
}

/// A call straight to the simulator: another caller of the deployment.
async fn direct(sim: &SimHandle, max_tokens: u64) -> StatusCode {
    let url = format!("{}{}", sim.url(), chat_path("gpt-4o"));
    let headers = [
        ("api-key", sim.config().api_key.clone()),
        ("content-type", "application/json".to_owned()),
    ];
    send(Method::POST, &url, &headers, body(max_tokens)).await.0
}

fn throttled(sims: &[SimHandle]) -> usize {
    sims.iter()
        .flat_map(|s| s.journal())
        .filter(|e| e.status == 429)
        .count()
}

fn admitted(sim: &SimHandle) -> usize {
    sim.journal().iter().filter(|e| e.status == 200).count()
}

/// The predicted lane of `instance` in `/admin/backends`.
async fn lane(gw: &TestGateway, instance: &str) -> serde_json::Value {
    let v = gw.admin_json("/admin/backends").await;
    let b = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == instance)
        .unwrap()
        .clone();
    b["lanes"][0].clone()
}

/// Instances with lane limits (`tpm` each) and priorities.
fn doc(sims: &[SimHandle], tpm: &[u64], priorities: &[u32], aware: bool) -> String {
    let instances: Vec<serde_json::Value> = tpm
        .iter()
        .zip(priorities)
        .map(|(t, p)| {
            serde_json::json!({
                "priority": p,
                "deployments": {"gpt-4o": {"name": "gpt-4o", "tpm": t}},
            })
        })
        .collect();
    config_with(
        sims,
        serde_json::json!({"instances": instances, "routing": {"rate_limit_aware": aware}}),
    )
}

#[tokio::test]
async fn skips_a_lane_without_room_so_no_request_meets_a_429() {
    let time = Time::new();
    let sims = limited_sims("skip", &time, &[(0, 10_000), (0, 10_000)]).await;
    let gw = start(&doc(&sims, &[10_000, 10_000], &[1, 1], true), &time).await;
    // About 2,020 tokens each: four fit in 10,000, a fifth does not.
    for i in 0..8 {
        assert_eq!(chat(&gw, 2_000).await, StatusCode::OK, "request {i}");
    }
    assert_eq!(throttled(&sims), 0, "no upstream 429");
    assert_eq!((admitted(&sims[0]), admitted(&sims[1])), (4, 4));
    // No lane has room now: the one with the most is still tried (the
    // prediction is an estimate), but after its 429 the other, with even
    // less room, is not; the client gets Azure's 429 and its wait.
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (status, headers, _) = send(Method::POST, &url, &auth(), body(2_000)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after-ms"), "{headers:?}");
    assert_eq!(throttled(&sims), 1, "one fallback attempt");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"aoai_lb_steer_skips_total{instance="skip0",reason="tokens"}"#)
            || m.contains(r#"aoai_lb_steer_skips_total{instance="skip1",reason="tokens"}"#),
        "{m}"
    );
    for s in ["skip0", "skip1"] {
        let l = lane(&gw, s).await;
        assert_eq!(l["deployment"], "gpt-4o");
        assert_eq!(l["tpm"], 10_000);
        let room = l["remaining_tokens"].as_i64().unwrap();
        assert!((0..2_121).contains(&room), "{l}");
        assert!(
            m.contains(&format!(
                r#"aoai_lb_lane_remaining_tokens{{instance="{s}",deployment="gpt-4o"}} {room}"#
            )),
            "{m}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_lane_comes_back_as_its_reservations_leave_the_window() {
    let time = Time::new();
    let sims = limited_sims("back", &time, &[(0, 10_000), (0, 10_000)]).await;
    // sim0 is preferred (priority 1) while it has room.
    let gw = start(&doc(&sims, &[10_000, 10_000], &[1, 2], true), &time).await;
    for _ in 0..4 {
        assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    }
    assert_eq!(admitted(&sims[0]), 4);
    // Full: the next one goes to the second group.
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[1]), 1);
    // 59.9 s on, sim0's reservations are still held.
    time.advance(59_900);
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[1]), 2);
    // Past 60 s they have left: sim0 is back.
    time.advance(300);
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[0]), 5);
    assert_eq!(throttled(&sims), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn answers_429_itself_once_a_429_confirmed_that_no_lane_has_room() {
    let time = Time::new();
    let sims = limited_sims("confirm", &time, &[(0, 10_000)]).await;
    let gw = start(&doc(&sims, &[10_000], &[1], true), &time).await;
    assert_eq!(chat(&gw, 4_000).await, StatusCode::OK);
    assert_eq!(chat(&gw, 4_000).await, StatusCode::OK);
    time.advance(30_000);
    assert_eq!(chat(&gw, 1_500).await, StatusCode::OK);
    // No predicted room for 1,000: tried anyway (the prediction is an
    // estimate), and Azure's 429 confirms it.
    time.advance(1_000);
    assert_eq!(chat(&gw, 1_000).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled(&sims), 1);
    // Its cooldown is over, but 9,000 will not fit before the 1,500 of
    // t=30 s leaves: the gateway answers itself, with that wait.
    time.advance(29_100);
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let (status, headers, _) = send(Method::POST, &url, &auth(), body(9_000)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((29_000..=30_100).contains(&wait), "{wait}");
    assert_eq!(throttled(&sims), 1, "no request sent");
    time.advance(wait);
    assert_eq!(chat(&gw, 9_000).await, StatusCode::OK);
    assert_eq!(throttled(&sims), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn re_anchors_on_headers_that_show_another_callers_load() {
    let time = Time::new();
    let sims = limited_sims("anchor", &time, &[(0, 10_000), (0, 10_000)]).await;
    let gw = start(&doc(&sims, &[10_000, 10_000], &[1, 2], true), &time).await;
    // Another client of sim0's deployment reserves about 6,000.
    for _ in 0..3 {
        assert_eq!(direct(&sims[0], 1_990).await, StatusCode::OK);
    }
    // The gateway does not know yet: its first request goes to sim0, and
    // the answer's remaining-tokens shows the other caller's load.
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[0]), 4);
    let l = lane(&gw, "anchor0").await;
    let room = l["remaining_tokens"].as_i64().unwrap();
    assert!((1_900..2_100).contains(&room), "{l}");
    // Too little for another 2,000: sim1 takes it, without a 429.
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[1]), 1);
    assert_eq!(throttled(&sims), 0);
    // A small request still fits on sim0.
    assert_eq!(chat(&gw, 1_000).await, StatusCode::OK);
    assert_eq!(admitted(&sims[0]), 5);
    assert_eq!(throttled(&sims), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn reads_which_budget_a_429_names_in_its_policy_id() {
    let time = Time::new();
    // sim0: 10,000 TPM; sim1 unlimited.
    let sims = limited_sims("tokpolicy", &time, &[(0, 10_000), (0, 0)]).await;
    let gw = start(&doc(&sims, &[10_000, 10_000], &[1, 2], true), &time).await;
    // Another caller takes 9,000 of sim0's tokens; the gateway cannot know.
    assert_eq!(direct(&sims[0], 8_990).await, StatusCode::OK);
    assert_eq!(chat(&gw, 2_000).await, StatusCode::OK, "failed over");
    assert_eq!(throttled(&sims), 1);
    let l = lane(&gw, "tokpolicy0").await;
    assert_eq!(l["remaining_tokens"], 0, "token policy: no room: {l}");
    assert_eq!(l["own_tokens"], 0, "a refused request reserves nothing");
    gw.shutdown().await;

    // A request budget: 6 RPM is one request per 10 s.
    let time = Time::new();
    let sims = limited_sims("callpolicy", &time, &[(6, 0), (0, 0)]).await;
    let instances = serde_json::json!([
        {"priority": 1, "deployments": {"gpt-4o": {"name": "gpt-4o", "rpm": 6}}},
        {"priority": 2},
    ]);
    let gw = start(
        &config_with(&sims, serde_json::json!({"instances": instances})),
        &time,
    )
    .await;
    assert_eq!(direct(&sims[0], 10).await, StatusCode::OK);
    assert_eq!(chat(&gw, 10).await, StatusCode::OK, "failed over");
    assert_eq!(throttled(&sims), 1);
    let l = lane(&gw, "callpolicy0").await;
    assert_eq!(l["remaining_requests"], 0, "{l}");
    assert!(l["remaining_tokens"].is_null(), "tokens not touched: {l}");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_access_log_names_lanes_skipped_for_lack_of_room() {
    // The real binary on the real clock: nothing leaves a 60 s window
    // during the test.
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("logskip0").rate_limit(0, 4_000),
        aoai_sim::InstanceConfig::new("logskip1"),
    ])
    .await;
    let instances = serde_json::json!([
        {"priority": 1, "deployments": {"gpt-4o": {"name": "gpt-4o", "tpm": 4_000}}},
        {"priority": 2},
    ]);
    let doc = config_with(&sims, serde_json::json!({"instances": instances}));
    let (bin, addr) = spawn_gateway_binary(&doc);
    let url = format!("http://{addr}{}", chat_path("gpt-4o"));
    for _ in 0..2 {
        let (s, _, _) = send(Method::POST, &url, &auth(), body(3_000)).await;
        assert_eq!(s, StatusCode::OK);
    }
    assert_eq!((admitted(&sims[0]), admitted(&sims[1])), (1, 1));
    let second = bin
        .wait_for_line(Duration::from_secs(5), |l| l.contains("\"skipped\""))
        .unwrap_or_else(|| panic!("no skip in the access log: {:#?}", bin.lines()));
    let rec: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(rec["message"], "request");
    assert_eq!(
        rec["skipped"],
        serde_json::json!([{"instance": "logskip0", "reason": "tokens"}])
    );
    assert_eq!(rec["instance"], "logskip1");
    // The first request skipped nothing, and says nothing about it.
    let lines = bin.all_text();
    let first = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "request" && v["instance"] == "logskip0")
        .unwrap();
    assert!(first.get("skipped").is_none(), "{first}");
}

/// Runs `n` requests one second apart (so nothing leaves the 60 s window)
/// and returns the upstream 429s and the client-visible errors.
async fn offered_load(aware: bool, n: usize) -> (usize, usize) {
    let time = Time::new();
    // Unequal quotas behind equal weights: plain least-loaded selection
    // sends a third of the traffic to the small one.
    let prefix = if aware { "aware" } else { "plain" };
    let sims = limited_sims(prefix, &time, &[(0, 4_000), (0, 20_000), (0, 20_000)]).await;
    let gw = start(
        &doc(&sims, &[4_000, 20_000, 20_000], &[1, 1, 1], aware),
        &time,
    )
    .await;
    let mut errors = 0;
    for _ in 0..n {
        if chat(&gw, 1_000).await != StatusCode::OK {
            errors += 1;
        }
        time.advance(1_000);
    }
    let upstream = throttled(&sims);
    gw.shutdown().await;
    (upstream, errors)
}

#[tokio::test]
async fn steering_avoids_the_429s_that_least_loaded_selection_meets() {
    // 40 requests of about 1,020 tokens against 44,000 TPM in all.
    let (with, with_errors) = offered_load(true, 40).await;
    let (without, _) = offered_load(false, 40).await;
    assert_eq!((with, with_errors), (0, 0), "steering: no upstream 429");
    // Without steering the small instance gets about 13 of 40 and can
    // hold 3; the chance it gets 3 or fewer is below 1e-4.
    assert!(without > 0, "without steering: {without} upstream 429s");
}

/// A provisioned (PTU) lane at priority 1 and a pay-as-you-go lane at
/// priority 2, on one time line.
async fn ptu_and_paygo(time: &Time) -> (Vec<SimHandle>, TestGateway) {
    // 10,000 tokens a minute of provisioned capacity: five requests of
    // about 2,000 tokens fill a minute of it.
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("ptu0")
            .deployment_ptu("gpt-4o", 10_000)
            .clock(time.sim.clone()),
        aoai_sim::InstanceConfig::new("paygo0").clock(time.sim.clone()),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances": [
            {"priority": 1, "deployments": ["gpt-4o"]},
            {"priority": 2, "deployments": ["gpt-4o"]},
        ]}),
    );
    let gw = start(&doc, time).await;
    (sims, gw)
}

#[tokio::test]
async fn a_busy_ptu_lane_is_skipped_before_it_429s_and_traffic_comes_back_as_it_drains() {
    let time = Time::new();
    let (sims, gw) = ptu_and_paygo(&time).await;
    // 2,001 tokens each: 20%, 40%, 60%, 80% and 100.1% utilization. The
    // provisioned deployment admits while it is at most 100%; the gateway
    // stops sending at 95%, so the sixth and later go to pay-as-you-go
    // instead of meeting the PTU's 429.
    for i in 0..10 {
        assert_eq!(chat(&gw, 2_000).await, StatusCode::OK, "request {i}");
    }
    assert_eq!(throttled(&sims), 0, "no upstream 429");
    assert_eq!((admitted(&sims[0]), admitted(&sims[1])), (5, 5));
    let l = lane(&gw, "ptu0").await;
    let u = l["utilization"].as_f64().unwrap();
    assert!((100.0..101.0).contains(&u), "{l}");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"aoai_lb_steer_skips_total{instance="ptu0",reason="utilization"} 5"#),
        "{m}"
    );
    // The simulator would have refused: it is over 100% now.
    assert_eq!(direct(&sims[0], 1).await, StatusCode::TOO_MANY_REQUESTS);

    // 30 s later the bucket has drained 5,000 tokens (to about 50%) and the
    // gateway's reading has faded below 95%: the PTU is tried again, and
    // its fresh reading (about 70%) keeps it in use.
    time.advance(30_000);
    for i in 0..2 {
        assert_eq!(chat(&gw, 2_000).await, StatusCode::OK, "request {i}");
    }
    assert_eq!((admitted(&sims[0]), admitted(&sims[1])), (7, 5));
    let u = lane(&gw, "ptu0").await["utilization"].as_f64().unwrap();
    assert!((89.0..91.0).contains(&u), "{u}");
    assert_eq!(throttled(&sims), 1, "only the direct probe met a 429");
    gw.shutdown().await;
}
