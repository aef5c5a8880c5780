//! Running the server: keys, settings layers, shard count, test clock, graceful shutdown
//! and restarts (including `kill -9`).

mod common;

use std::process::{Command, Stdio};

use common::{Opts, Server, names};
use serde_json::json;

#[tokio::test]
async fn sigterm_flushes_and_exits_zero_and_data_survives_restart() {
    let mut s = Server::start().await;
    let (st, _) = s
        .ingest(
            "/v1/identify",
            &json!({"userId": "u1", "anonymousId": "a1", "traits": {"plan": "pro"}}),
        )
        .await;
    assert_eq!(st, 200);
    s.ingest(
        "/v1/track",
        &json!({"userId": "u1", "event": "Kept", "messageId": "k-1"}),
    )
    .await;
    s.admin(
        "PATCH",
        "/v1/profiles/user_id:u1/traits",
        Some(&json!({"seats": 4})),
    )
    .await;
    let (_, before) = s.get("/v1/profiles/user_id:u1").await;
    let keys = (s.write_key.clone(), s.admin_token.clone());
    let tmp = s.keep_dir();
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
    let s2 = Server::start_in(&s.data_dir, Opts::default()).await;
    assert_eq!(
        (s2.write_key.clone(), s2.admin_token.clone()),
        keys,
        "development keys are kept"
    );
    let (st, after) = s2.get("/v1/profiles/anonymous_id:a1").await;
    assert_eq!(st, 200);
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["traits"], json!({"plan": "pro", "seats": 4}));
    assert_eq!(after["identities"], before["identities"]);
    assert_eq!(
        names(&s2.events("user_id:u1", "type=track").await),
        vec!["Kept"]
    );
    // New events get sequence numbers after the old ones.
    s2.ingest("/v1/track", &json!({"userId": "u1", "event": "New"}))
        .await;
    let ev = s2.events("user_id:u1", "type=track").await;
    assert!(ev[0]["seq"].as_u64() > ev[1]["seq"].as_u64());
    drop(tmp);
}

#[tokio::test]
async fn acknowledged_messages_survive_kill_9() {
    let mut s = Server::start().await;
    let batch: Vec<serde_json::Value> = (0..300)
        .map(|i| json!({"type": "track", "userId": format!("k{}", i % 7), "event": "Crash", "messageId": format!("c-{i}")}))
        .collect();
    let (st, v) = s.ingest("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!((st, v["accepted"].clone()), (200, json!(300)));
    let tmp = s.keep_dir();
    s.kill9();
    let s2 = Server::start_in(&s.data_dir, Opts::default()).await;
    let mut total = 0;
    for u in 0..7 {
        total += s2
            .events(&format!("user_id:k{u}"), "type=track&limit=1000")
            .await
            .len();
    }
    assert_eq!(total, 300);
    assert_eq!(s2.all_profiles().await.len(), 7);
    drop(tmp);
}

#[tokio::test]
async fn shard_count_is_fixed_per_data_dir() {
    let mut s = Server::start_with(Opts {
        env: vec![("USER360_SHARDS".into(), "3".into())],
        ..Default::default()
    })
    .await;
    assert_eq!(s.metric("user360_shards").await, Some(3.0));
    let batch: Vec<serde_json::Value> = (0..50)
        .map(|i| json!({"type": "identify", "userId": format!("s{i}")}))
        .collect();
    s.ingest("/v1/batch", &json!({"batch": batch})).await;
    let tmp = s.keep_dir();
    s.terminate();
    let s2 = Server::start_in(
        &s.data_dir,
        Opts {
            env: vec![("USER360_SHARDS".into(), "5".into())],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(s2.metric("user360_shards").await, Some(3.0));
    assert_eq!(s2.all_profiles().await.len(), 50);
    assert_eq!(s2.get("/v1/profiles/user_id:s49").await.0, 200);
    drop(tmp);
}

#[test]
fn development_keys_refuse_to_listen_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_user360"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path())
        .env_remove("USER360_WRITE_KEYS")
        .env_remove("USER360_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("development keys"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn manual_clock_only_on_loopback_and_bad_settings_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_user360"));
        c.args(args)
            .arg("--data-dir")
            .arg(tmp.path())
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run(
        &["serve", "--listen", "0.0.0.0:0"],
        &[
            ("USER360_CLOCK", "manual"),
            ("USER360_ADMIN_TOKEN", "t"),
            ("USER360_WRITE_KEYS", "w"),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let out = run(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("USER360_INGEST__MAX_DEPTH", "many")],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("max_depth"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/nonexistent/u360.toml",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[tokio::test]
async fn settings_layer_file_then_env_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("u360.toml");
    std::fs::write(&cfg, "admin_token = \"from-file\"\nwrite_keys = [\"wk-file\"]\n[ingest]\nmax_batch_messages = 2\n").unwrap();
    let data = tmp.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_user360"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .env("USER360_WRITE_KEYS", "wk-env-1, wk-env-2")
        .env("USER360_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..500 {
        if http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready);
    let batch = json!({"batch": [{"type": "track", "userId": "u", "event": "a"}, {"type": "track", "userId": "u", "event": "b"}, {"type": "track", "userId": "u", "event": "c"}]});
    let r = http
        .post(format!("{url}/v1/batch"))
        .basic_auth("wk-env-2", Some(""))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 2, "max_batch_messages from the file");
    let r = http
        .post(format!("{url}/v1/batch"))
        .basic_auth("wk-file", Some(""))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "env replaced the file's write keys");
    let r = http
        .get(format!("{url}/v1/profiles/user_id:u"))
        .bearer_auth("from-file")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn clock_endpoints_exist_only_with_the_manual_clock() {
    let s = Server::start().await;
    assert_eq!(s.get("/v1/admin/clock").await.0, 404);
    let m = Server::manual().await;
    let (_, a) = m.get("/v1/admin/clock").await;
    let (_, b) = m.get("/v1/admin/clock").await;
    assert_eq!(a, b, "manual time stands still");
    let moved = m.advance(90_061_001).await;
    let t0 =
        user360::segment::timefmt::parse_rfc3339_ms(a["now"].as_str().unwrap(), false).unwrap();
    let t1 =
        user360::segment::timefmt::parse_rfc3339_ms(moved["now"].as_str().unwrap(), false).unwrap();
    assert_eq!(t1 - t0, 90_061_001);
    let (st, v) = m
        .admin("POST", "/v1/admin/clock", Some(&json!({"advance_ms": -1})))
        .await;
    assert_eq!((st, v["path"].as_str()), (400, Some("advance_ms")));
    let (st, _) = m
        .admin("POST", "/v1/admin/clock", Some(&json!({"advance": 5})))
        .await;
    assert_eq!(st, 400);
    // Ingest uses server time.
    m.ingest("/v1/track", &json!({"userId": "u", "event": "At"}))
        .await;
    assert_eq!(
        m.events("user_id:u", "type=track").await[0]["received_at"],
        moved["now"]
    );
}
