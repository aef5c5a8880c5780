//! Snapshots and backups over HTTP and the CLI: recovery from a snapshot plus the log tail,
//! backup download, inspect, restore, and refusal of damaged, truncated or foreign files.

mod common;

use std::process::Command;

use common::{Opts, Server, names};
use serde_json::{Value, json};

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_user360"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn seed(s: &Server, prefix: &str, n: usize) {
    let batch: Vec<Value> = (0..n)
        .flat_map(|i| {
            [
                json!({"type": "identify", "userId": format!("{prefix}{i}"), "traits": {"n": i, "plan": "free"}, "messageId": format!("{prefix}-id-{i}")}),
                json!({"type": "track", "userId": format!("{prefix}{i}"), "event": "Seeded", "properties": {"i": i}, "messageId": format!("{prefix}-tr-{i}")}),
            ]
        })
        .collect();
    for part in batch.chunks(1000) {
        let (st, v) = s.ingest("/v1/batch", &json!({"batch": part})).await;
        assert_eq!(
            (st, v["accepted"].as_u64()),
            (200, Some(part.len() as u64)),
            "{}",
            v["rejected"][0]
        );
    }
}

#[tokio::test]
async fn recovery_from_snapshot_plus_log_tail_after_kill_9() {
    let mut s = Server::start().await;
    seed(&s, "a", 3000).await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "gone", "traits": {"x": 1}}),
    )
    .await;
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:gone", None).await.0,
        204
    );
    let (st, snap) = s.admin("POST", "/v1/admin/snapshots", None).await;
    assert_eq!(st, 201, "{snap}");
    assert_eq!(snap["profiles"], 3000);
    assert!(snap["bytes"].as_u64().unwrap() > 0);
    assert!(snap["id"].is_string() && snap["created_at"].is_string());
    let (_, list) = s.get("/v1/admin/snapshots").await;
    assert_eq!(list["snapshots"][0]["id"], snap["id"]);
    // After the snapshot: new profiles, changed traits, a delete and more events.
    seed(&s, "b", 200).await;
    s.admin(
        "PATCH",
        "/v1/profiles/user_id:a7/traits",
        Some(&json!({"plan": "pro"})),
    )
    .await;
    s.ingest(
        "/v1/track",
        &json!({"userId": "a7", "event": "After", "messageId": "after-1"}),
    )
    .await;
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:a8", None).await.0,
        204
    );
    let tmp = s.keep_dir();
    s.kill9();
    let s2 = Server::start_in(&s.data_dir, Opts::default()).await;
    assert_eq!(s2.all_profiles().await.len(), 3000 + 200 - 1);
    let (_, a7) = s2.get("/v1/profiles/user_id:a7").await;
    assert_eq!(a7["traits"], json!({"n": 7, "plan": "pro"}));
    assert_eq!(
        names(&s2.events("user_id:a7", "type=track").await),
        vec!["After", "Seeded"]
    );
    assert_eq!(s2.get("/v1/profiles/user_id:a8").await.0, 404);
    assert_eq!(s2.get("/v1/profiles/user_id:gone").await.0, 404);
    assert_eq!(s2.get("/v1/profiles/user_id:b199").await.0, 200);
    // Dedup survived: resending acknowledged messages changes nothing.
    let (_, v) = s2
        .ingest(
            "/v1/track",
            &json!({"userId": "a7", "event": "After", "messageId": "after-1"}),
        )
        .await;
    assert_eq!(v["duplicates"], 1);
    let (_, v) = s2
        .ingest(
            "/v1/track",
            &json!({"userId": "a1", "event": "Seeded", "messageId": "a-tr-1"}),
        )
        .await;
    assert_eq!(v["duplicates"], 1);
    drop(tmp);
}

#[tokio::test]
async fn backup_download_inspect_restore_and_refusals() {
    let mut s = Server::start().await;
    seed(&s, "u", 500).await;
    s.admin(
        "PATCH",
        "/v1/profiles/user_id:u3/traits",
        Some(&json!({"vip": true})),
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("backup.u360bak");
    let (ok, out, err) = cli(&[
        "snapshot",
        "create",
        "--server",
        &s.url,
        "--token",
        &s.admin_token,
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    // Written after the snapshot: not in the backup.
    s.ingest("/v1/identify", &json!({"userId": "late"})).await;
    let (ok, out, err) = cli(&["snapshot", "inspect", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("profiles: 500") && out.contains("checksums: ok"),
        "{out}"
    );

    let target = work.path().join("restored");
    let (ok, out, err) = cli(&[
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let r = Server::start_in(&target, Opts::default()).await;
    assert_eq!(r.all_profiles().await.len(), 500);
    let (_, u3) = r.get("/v1/profiles/user_id:u3").await;
    assert_eq!(u3["traits"], json!({"n": 3, "plan": "free", "vip": true}));
    assert_eq!(
        names(&r.events("user_id:u3", "type=track").await),
        vec!["Seeded"]
    );
    assert_eq!(r.get("/v1/profiles/user_id:late").await.0, 404);
    // A data dir in use is refused and left as it is.
    let (ok, _, err) = cli(&[
        "snapshot",
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        target.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("refusing to restore"), "{err}");
    assert_eq!(r.all_profiles().await.len(), 500);
    drop(r);

    // Damaged, truncated and foreign files are refused, and the existing data is untouched.
    let bytes = std::fs::read(&file).unwrap();
    let flipped = work.path().join("flipped.u360bak");
    let mut f = bytes.clone();
    let mid = f.len() / 2;
    f[mid] ^= 0x40;
    std::fs::write(&flipped, &f).unwrap();
    let truncated = work.path().join("truncated.u360bak");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let foreign = work.path().join("foreign.u360bak");
    std::fs::write(&foreign, b"PK\x03\x04 definitely a zip file").unwrap();
    for (path, word) in [
        (&flipped, "damaged"),
        (&truncated, "truncated"),
        (&foreign, "not a User360 backup"),
    ] {
        let (ok, _, err) = cli(&["snapshot", "inspect", path.to_str().unwrap()]);
        assert!(
            !ok && err.contains(word),
            "inspect {}: {err}",
            path.display()
        );
        let (ok, _, err) = cli(&[
            "snapshot",
            "restore",
            path.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ]);
        assert!(
            !ok && err.contains(word),
            "restore {}: {err}",
            path.display()
        );
    }
    let again = Server::start_in(&target, Opts::default()).await;
    assert_eq!(
        again.all_profiles().await.len(),
        500,
        "the failed restores left the data dir as it was"
    );
    assert_eq!(s.get("/v1/admin/snapshots/999999").await.0, 404);
    s.terminate();
}
