//! A full disk: ingest answers 503 and acknowledges nothing it could not persist; when the
//! disk has room again the server recovers by itself (no restart), with every acknowledged
//! message and nothing else; a restart afterwards agrees.
//!
//! Needs a small tmpfs (`mount -t tmpfs`, root); where mounting is not allowed the test says
//! so and returns.

mod common;

use std::process::Command;

use common::{Opts, Server};
use serde_json::{Value, json};

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn full_disk_answers_503_and_loses_nothing_acknowledged() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(mnt.clone());
    let dir = mnt.join("data");
    // Ballast to delete later, so the disk "gets room again".
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![7u8; 2 << 20]).unwrap();
    let mut s = Server::start_in(&dir, Opts::default()).await;
    let blob = "x".repeat(20_000);
    let mut acked: Vec<String> = Vec::new();
    let mut saw_503 = false;
    for b in 0..400 {
        let batch: Vec<Value> = (0..10)
            .map(|i| json!({"type": "track", "userId": format!("u{}", i % 3), "event": "Fill", "properties": {"blob": blob}, "messageId": format!("f-{b}-{i}")}))
            .collect();
        let (st, v) = s.ingest("/v1/batch", &json!({"batch": batch})).await;
        match st {
            200 => {
                assert_eq!(v["accepted"], 10, "{}", v["rejected"]);
                acked.extend((0..10).map(|i| format!("f-{b}-{i}")));
            }
            503 => {
                assert_eq!(v["code"], "unavailable", "{v}");
                saw_503 = true;
                break;
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert!(saw_503, "a 6 MiB disk must fill up");
    assert!(!acked.is_empty());
    // Nothing more is accepted while the log cannot be written, and readiness says so.
    let (st, _) = s
        .ingest("/v1/track", &json!({"userId": "u9", "event": "After"}))
        .await;
    assert_eq!(st, 503);
    let r = s
        .http
        .get(format!("{}/readyz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        s.http
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The disk gets room: the server recovers by itself.
    std::fs::remove_file(&ballast).unwrap();
    let mut healthy = false;
    for _ in 0..100 {
        if s.http
            .get(format!("{}/readyz", s.url))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        healthy,
        "the server did not recover after the disk got room: {:?}",
        s.stderr()
    );
    let s2 = &s;
    let mut stored = std::collections::BTreeSet::new();
    for u in 0..3 {
        let mut cursor = String::new();
        loop {
            let (st, v) = s2
                .get(&format!(
                    "/v1/profiles/user_id:u{u}/events?type=track&limit=1000&cursor={cursor}"
                ))
                .await;
            assert_eq!(st, 200);
            for e in v["events"].as_array().unwrap() {
                assert!(
                    stored.insert(e["message_id"].as_str().unwrap().to_owned()),
                    "stored twice: {}",
                    e["message_id"]
                );
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
    }
    for m in &acked {
        assert!(
            stored.contains(m),
            "acknowledged {m} is missing after recovery"
        );
    }
    let (st, _) = s2
        .ingest(
            "/v1/track",
            &json!({"userId": "u9", "event": "Works again", "messageId": "again"}),
        )
        .await;
    assert_eq!(st, 200);
    // A restart agrees with what the running server showed.
    let total = stored.len();
    s.terminate();
    let s3 = Server::start_in(&dir, Opts::default()).await;
    let mut after = 0;
    for u in 0..3 {
        let mut cursor = String::new();
        loop {
            let (_, v) = s3
                .get(&format!(
                    "/v1/profiles/user_id:u{u}/events?type=track&limit=1000&cursor={cursor}"
                ))
                .await;
            after += v["events"].as_array().unwrap().len();
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
    }
    assert_eq!(after, total);
    assert_eq!(s3.events("user_id:u9", "type=track").await.len(), 1);
}
