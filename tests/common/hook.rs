//! A webhook receiver for tests: an HTTP server on 127.0.0.1 that records every request
//! and answers as a script says (by delivery id and attempt), so tests can fail the first
//! attempts, answer 429 with Retry-After, or be a dead endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Lower-case header names.
    pub headers: HashMap<String, String>,
    /// The raw body.
    pub body: String,
    /// What the receiver answered.
    pub status: u16,
}

impl Hit {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    /// A header.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Decides the answer: (status, Retry-After seconds) for the n-th request (1-based) of a
/// delivery id.
pub type Script = Arc<dyn Fn(&Value, usize) -> (u16, Option<u64>) + Send + Sync>;

/// A running receiver (stopped on drop).
pub struct Hook {
    /// `http://127.0.0.1:PORT/hook`
    pub url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    /// A receiver answering 200 to everything.
    pub async fn ok() -> Hook {
        Hook::start(Arc::new(|_, _| (200, None))).await
    }

    /// A receiver on a given port (0: any) answering by `script`.
    pub async fn start_on(port: u16, script: Script) -> Hook {
        use axum::routing::post;
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::new(Mutex::new(Vec::new()));
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::new(Mutex::new(HashMap::new()));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (h, seen, script) = (h.clone(), seen.clone(), script.clone());
                    async move {
                        let body = String::from_utf8_lossy(&body).into_owned();
                        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let id = v["id"].as_str().unwrap_or("").to_owned();
                        let n = {
                            let mut s = seen.lock().unwrap();
                            let c = s.entry(id).or_default();
                            *c += 1;
                            *c
                        };
                        let (status, retry_after) = script(&v, n);
                        h.lock().unwrap().push(Hit {
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                })
                                .collect(),
                            body,
                            status,
                        });
                        let mut resp = axum::response::Response::builder().status(status);
                        if let Some(s) = retry_after {
                            resp = resp.header("retry-after", s.to_string());
                        }
                        resp.body(axum::body::Body::from("ok")).unwrap()
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hook { url, hits, task }
    }

    /// A receiver on any port answering by `script`.
    pub async fn start(script: Script) -> Hook {
        Hook::start_on(0, script).await
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits (10 s at most) until `n` requests arrived, then returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "receiver: expected {n} requests, got {}: {:?}",
                hits.len(),
                hits.iter().map(|h| h.body.clone()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for `n` requests, then checks that no further one arrives within `quiet`.
    pub async fn expect(&self, n: usize, quiet: Duration) -> Vec<Hit> {
        self.wait_for(n).await;
        tokio::time::sleep(quiet).await;
        let hits = self.hits();
        assert_eq!(
            hits.len(),
            n,
            "receiver: more requests than expected: {:?}",
            hits.iter().map(|h| h.body.clone()).collect::<Vec<_>>()
        );
        hits
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}
