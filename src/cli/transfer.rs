//! `user360 export` and `user360 import`: profiles out of, and into, a running server over
//! its HTTP API, streamed, with a progress bar on stderr (rows, rate, and an ETA when the
//! size is known: the profile or segment count for an export, the file size for an import).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// `export --format csv|jsonl [--segment S] [--fields F] [-o FILE]`: streams the export to
/// the file (or stdout) and answers the number of rows.
pub async fn export(
    server: &str,
    token: &str,
    format: &str,
    segment: Option<&str>,
    fields: Option<&str>,
    out: Option<&Path>,
) -> anyhow::Result<u64> {
    let base = server.trim_end_matches('/');
    let http = reqwest::Client::new();
    // How many rows to expect, for the ETA.
    let total = match segment {
        Some(s) => http
            .get(format!("{base}/v1/segments/{s}"))
            .bearer_auth(token)
            .send()
            .await
            .ok()
            .and_then(|r| r.status().is_success().then_some(r))
            .map(|r| async move { r.json::<serde_json::Value>().await.ok() }),
        None => None,
    };
    let total = match total {
        Some(f) => f.await.and_then(|v| v["count"].as_u64()),
        None => None,
    };
    let mut url = reqwest::Url::parse(&format!("{base}/v1/export/profiles"))
        .with_context(|| format!("invalid server URL {server:?}"))?;
    url.query_pairs_mut().append_pair("format", format);
    if let Some(s) = segment {
        url.query_pairs_mut().append_pair("segment", s);
    }
    if let Some(f) = fields {
        url.query_pairs_mut().append_pair("fields", f);
    }
    let r = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !r.status().is_success() {
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        bail!(
            "the server answered {status}: {}",
            body["message"].as_str().unwrap_or("no message")
        );
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}")
                .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} rows ({per_sec}) {msg}")
                .expect("valid template"),
        ),
    };
    let mut sink: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut rows = RowCounter::new(format == "csv");
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        // A cut export never looks complete: the server aborts the response on an error.
        let chunk = chunk.context("the export was cut off; the output is incomplete")?;
        sink.write_all(&chunk)?;
        bar.inc(rows.feed(&chunk));
    }
    sink.flush()?;
    bar.finish_with_message("done");
    Ok(rows.rows)
}

/// Counts the rows of an export as it streams by: JSONL lines, or CSV records after the
/// header (a line break inside a quoted cell is not the end of a record).
pub struct RowCounter {
    csv: bool,
    in_quotes: bool,
    header_seen: bool,
    /// Rows seen so far.
    pub rows: u64,
}

impl RowCounter {
    /// A counter for CSV (`csv`) or JSONL.
    pub fn new(csv: bool) -> RowCounter {
        RowCounter {
            csv,
            in_quotes: false,
            header_seen: !csv,
            rows: 0,
        }
    }

    /// Counts the rows a chunk ends; answers how many.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        let mut n = 0;
        for &b in chunk {
            match b {
                // `""` inside a quoted cell toggles twice: still inside.
                b'"' if self.csv => self.in_quotes = !self.in_quotes,
                b'\n' if !self.in_quotes => {
                    if self.header_seen {
                        n += 1;
                    } else {
                        self.header_seen = true;
                    }
                }
                _ => {}
            }
        }
        self.rows += n;
        n
    }
}

/// `import FILE [--format csv|jsonl]`: streams the file to the server (format from the
/// extension unless given) and answers the server's summary.
pub async fn import(
    server: &str,
    token: &str,
    file: &PathBuf,
    format: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let base = server.trim_end_matches('/');
    let format = match format {
        Some(f) => f.to_owned(),
        None => match file.extension().and_then(|e| e.to_str()) {
            Some("csv") => "csv".to_owned(),
            Some("jsonl") | Some("ndjson") => "jsonl".to_owned(),
            _ => bail!(
                "cannot tell the format of {}: give --format csv or --format jsonl",
                file.display()
            ),
        },
    };
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .expect("valid template"),
    );
    let progress = bar.clone();
    let stream = tokio_util_like::chunks(f).map(move |c| {
        if let Ok(b) = &c {
            progress.inc(b.len() as u64);
        }
        c
    });
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/import/profiles?format={format}"))
        .bearer_auth(token)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    bar.finish_and_clear();
    if !status.is_success() {
        bail!(
            "the server answered {status}: {}",
            body["message"].as_str().unwrap_or("no message")
        );
    }
    Ok(body)
}

/// Reading a file as a stream of chunks (what tokio-util's `ReaderStream` does, without
/// the crate).
mod tokio_util_like {
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    pub fn chunks(
        f: tokio::fs::File,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(f, |mut f| async move {
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RowCounter;

    #[test]
    fn csv_rows_are_records_not_lines() {
        let text = b"id,note\n1,\"two\nlines\"\n2,\"say \"\"hi\"\"\nthere\"\n3,plain\n";
        let mut whole = RowCounter::new(true);
        assert_eq!(whole.feed(text), 3);
        // The same, a byte at a time (chunks split anywhere).
        let mut bytes = RowCounter::new(true);
        let n: u64 = text.iter().map(|b| bytes.feed(&[*b])).sum();
        assert_eq!((n, bytes.rows), (3, 3));
        let mut jsonl = RowCounter::new(false);
        assert_eq!(jsonl.feed(b"{\"a\":\"x\\ny\"}\n{}\n"), 2);
    }
}
