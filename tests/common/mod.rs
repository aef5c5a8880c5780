//! Test harness: starts the real `user360` binary on an ephemeral port with a fresh data
//! dir and talks HTTP to it. Every integration test goes through this.

#![allow(dead_code)]

pub mod hook;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server process (killed on drop).
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The development write key.
    pub write_key: String,
    /// The development admin token.
    pub admin_token: String,
    /// The data dir (removed on drop unless kept).
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    /// HTTP client.
    pub http: reqwest::Client,
}

/// Options for starting a server.
#[derive(Default, Clone)]
pub struct Opts {
    /// Use the manual test clock.
    pub manual_clock: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Server {
    /// Starts a server with default settings and a fresh data dir.
    pub async fn start() -> Server {
        Server::start_with(Opts::default()).await
    }

    /// Starts a server with the manual clock.
    pub async fn manual() -> Server {
        Server::start_with(Opts {
            manual_clock: true,
            ..Opts::default()
        })
        .await
    }

    /// Starts a server with options and a fresh data dir.
    pub async fn start_with(opts: Opts) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, opts).await;
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir (restart tests).
    pub async fn start_in(dir: &Path, opts: Opts) -> Server {
        user360::init_tls();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_user360"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir);
        // The server reads every USER360_* variable as a setting: start from none.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("USER360_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("USER360_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.manual_clock {
            cmd.env("USER360_CLOCK", "manual");
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start user360");
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = stderr_lines.clone();
            let err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("listening line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; stderr: {:?}",
                    stderr_lines.lock().unwrap()
                )
            })
            .to_owned();
        let find = |prefix: &str| -> String {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(v) = stderr_lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
                {
                    return v;
                }
                assert!(Instant::now() < deadline, "no {prefix:?} line on stderr");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let write_key = find("write key: ");
        let admin_token = find("admin token: ");
        let s = Server {
            url,
            write_key,
            admin_token,
            data_dir: dir.to_path_buf(),
            _tmp: None,
            child,
            stderr: stderr_lines,
            http: reqwest::Client::new(),
        };
        s.wait_ready().await;
        s
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }

    /// Kills the process with SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Takes the temp dir so it outlives this server (for restarts).
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    /// POST to an ingest endpoint with the write key (HTTP Basic).
    pub async fn ingest(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .basic_auth(&self.write_key, Some(""))
            .json(body)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    /// POST raw bytes to an ingest endpoint with the write key and extra headers.
    pub async fn ingest_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .basic_auth(&self.write_key, Some(""))
            .body(body);
        let mut has_ct = false;
        for (k, v) in headers {
            has_ct |= k.eq_ignore_ascii_case("content-type");
            req = req.header(*k, *v);
        }
        if !has_ct {
            req = req.header("content-type", "application/json");
        }
        split(req.send().await.unwrap()).await
    }

    /// An admin request (Bearer token).
    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(b);
        }
        split(req.send().await.unwrap()).await
    }

    /// A value of `/metrics` (Prometheus text), if the server reports it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(&self.http, &self.url, name).await
    }

    /// GET with the admin token.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.admin("GET", path, None).await
    }

    /// A profile's events of one type, newest first.
    pub async fn events(&self, key: &str, query: &str) -> Vec<Value> {
        let (s, v) = self
            .get(&format!("/v1/profiles/{key}/events?{query}"))
            .await;
        assert_eq!(s, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    /// Every profile (walking all pages).
    pub async fn all_profiles(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let (s, v) = self
                .get(&format!("/v1/profiles?limit=1000&cursor={cursor}"))
                .await;
            assert_eq!(s, 200, "{v}");
            out.extend(v["profiles"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }

    /// Moves the manual clock forward.
    pub async fn advance(&self, ms: i64) -> Value {
        let (s, v) = self
            .admin(
                "POST",
                "/v1/admin/clock",
                Some(&serde_json::json!({"advance_ms": ms})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }
}

/// Status and JSON body (Null when the body is empty, a string when not JSON).
pub async fn split(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The (type, value) pairs of a profile's identities, sorted.
pub fn identity_set(profile: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = profile["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap().to_owned(),
                i["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Pairs for [`identity_set`] comparisons.
pub fn ids(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

/// Gzips bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The event names of a list of events, in order.
pub fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A tiny xorshift64* generator: deterministic per seed, no crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn range(&mut self, lo: u64, hi_incl: u64) -> u64 {
        lo + self.below(hi_incl - lo + 1)
    }
}

/// A value of a server's `/metrics` by base URL (for tasks that hold only a client).
pub async fn metric_at(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
