//! `user360 snapshot create|restore|inspect`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::segment::timefmt::format_ms;
use crate::store::backup;

/// `snapshot create`: asks the server for a snapshot and downloads it as a backup file.
pub async fn create(server: &str, token: &str, out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let base = server.trim_end_matches('/');
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/admin/snapshots"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    if status != 201 {
        bail!(
            "the server answered {status}: {}",
            body["message"].as_str().unwrap_or("no message")
        );
    }
    let id = body["id"]
        .as_str()
        .context("the server's answer has no snapshot id")?
        .to_owned();
    let path = out.unwrap_or_else(|| PathBuf::from(format!("user360-snapshot-{id}.u360bak")));
    let r = http
        .get(format!("{base}/v1/admin/snapshots/{id}"))
        .bearer_auth(token)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("downloading snapshot {id} failed with {}", r.status());
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes} ({bytes_per_sec}) {msg}")
            .expect("valid template"),
    );
    bar.set_message(format!("snapshot {id} → {}", path.display()));
    let tmp = path.with_extension("partial");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the download was cut off")?;
        file.write_all(&chunk)?;
        bar.inc(chunk.len() as u64);
    }
    file.sync_all()?;
    drop(file);
    // Check what arrived before calling it a backup.
    backup::read_backup(&tmp).with_context(|| {
        format!(
            "the downloaded file {} is not a valid backup",
            tmp.display()
        )
    })?;
    std::fs::rename(&tmp, &path)?;
    bar.finish_with_message(format!("snapshot {id} saved to {}", path.display()));
    Ok(path)
}

/// `snapshot inspect`: checks a backup file and describes it.
pub fn inspect(file: &Path) -> anyhow::Result<String> {
    let b = backup::read_backup(file).with_context(|| format!("cannot use {}", file.display()))?;
    let log_bytes: usize = b.logs.iter().map(|(_, _, v)| v.len()).sum();
    Ok(format!(
        "backup {}: snapshot {} taken {}\n  shards: {}\n  profiles: {}\n  chunks: {} ({} bytes)\n  sections: {}\n  log segments: {} ({} bytes)\n  checksums: ok",
        file.display(),
        b.manifest.id,
        format_ms(b.manifest.created_at),
        b.shards,
        b.manifest.profiles(),
        b.manifest.chunks.len(),
        b.chunks.iter().map(|(_, _, v)| v.len()).sum::<usize>(),
        b.sections
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        b.logs.len(),
        log_bytes,
    ))
}

/// `snapshot restore`: checks the whole file, then replaces the data dir with it.
pub fn restore(file: &Path, data_dir: &Path) -> anyhow::Result<String> {
    let b = backup::read_backup(file)
        .with_context(|| format!("refusing to restore {}", file.display()))?;
    let moved = backup::restore(&b, data_dir)
        .with_context(|| format!("refusing to restore into {}", data_dir.display()))?;
    let mut msg = format!(
        "restored snapshot {} ({} profiles) into {}",
        b.manifest.id,
        b.manifest.profiles(),
        data_dir.display()
    );
    if let Some(old) = moved {
        msg.push_str(&format!(
            "; the previous data dir was moved to {}",
            old.display()
        ));
    }
    Ok(msg)
}
