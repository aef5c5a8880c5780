//! Starting and stopping a server: data dir, keys, shard count, binding, recovery,
//! serving, and graceful shutdown in a fixed order (HTTP, then shards flush their logs).

use std::future::Future;
use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::api::auth::Keys;
use crate::api::{AppState, Services};
use crate::config::{ClockSetting, Settings};
use crate::domain::identity::IdentityRules;
use crate::grid::Grid;
use crate::grid::clock::Clock;
use crate::grid::registry::Registry;
use crate::grid::timer::Timers;
use crate::ingest::Ingestor;
use crate::store::meta::Meta;

/// The process-wide Prometheus recorder (installed once, even with several servers in one
/// test process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ])
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

fn random_key(prefix: &str) -> String {
    let bytes: [u8; 18] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// Fills in missing keys with development keys kept in the data dir; true if any was made.
fn keys_for(settings: &Settings, meta: &Meta) -> anyhow::Result<(Keys, bool)> {
    let mut dev = false;
    let mut write_keys = settings.write_keys.clone();
    if write_keys.is_empty() {
        dev = true;
        let k = match meta.get("dev_write_key")? {
            Some(k) => k,
            None => {
                let k = random_key("wk_dev_");
                meta.set("dev_write_key", &k)?;
                k
            }
        };
        eprintln!("write key: {k}");
        write_keys.push(k);
    }
    let mut admin = settings.admin_token.clone();
    if admin.is_empty() {
        dev = true;
        admin = match meta.get("dev_admin_token")? {
            Some(t) => t,
            None => {
                let t = random_key("adm_dev_");
                meta.set("dev_admin_token", &t)?;
                t
            }
        };
        eprintln!("admin token: {admin}");
    }
    Ok((Keys::new(write_keys, admin), dev))
}

/// The shard count of the data dir (fixed when it was created).
fn shard_count(settings: &Settings, meta: &Meta) -> anyhow::Result<u16> {
    let wanted = if settings.shards == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        settings.shards
    } as u16;
    match meta.get("shards")? {
        Some(s) => {
            let stored: u16 = s.parse().context("data dir has a corrupt shard count")?;
            if settings.shards != 0 && stored != wanted {
                tracing::warn!(
                    configured = wanted,
                    stored,
                    "the data dir was created with another shard count; keeping {stored}"
                );
            }
            Ok(stored)
        }
        None => {
            meta.set("shards", &wanted.to_string())?;
            Ok(wanted)
        }
    }
}

/// Runs a server until `shutdown` resolves. Must run inside an actix `System`.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    // Refuse before touching the data dir, so a refused start leaves nothing behind.
    let dev_keys = settings.write_keys.is_empty() || settings.admin_token.is_empty();
    if dev_keys && !settings.listen_is_loopback() {
        bail!(
            "refusing to listen on {} with development keys: set admin_token and write_keys (or USER360_ADMIN_TOKEN and USER360_WRITE_KEYS) to listen beyond loopback",
            settings.listen
        );
    }
    // A broken mappings file stops the start here, before anything listens.
    let file_mappings = if settings.mappings_file.exists() {
        crate::grid::mappings::check_file(
            &settings.mappings_file,
            (settings.ingest.max_trait_bytes, settings.ingest.max_depth),
        )?
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create the data dir {}", settings.data_dir.display()))?;
    let meta = Meta::open(&settings.data_dir)?;
    let (keys, _) = keys_for(&settings, &meta)?;
    let shards = shard_count(&settings, &meta)?;

    let addr = settings.listen_addr().context("invalid listen address")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{local}")?;
        out.flush()?;
    }
    let state = Arc::new(AppState {
        services: std::sync::OnceLock::new(),
        metrics: metrics_handle(),
    });
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn({
        let app = crate::api::router(state.clone());
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_http_rx.await;
                })
                .await
        }
    });

    let clock = Arc::new(match settings.clock {
        ClockSetting::System => Clock::system(),
        ClockSetting::Manual => Clock::manual(),
    });
    let timers = Timers::new(clock.clone());
    let registry = Arc::new(Registry::new(
        shards,
        Arc::new(IdentityRules::new(&settings.identity)),
    ));
    let started = std::time::Instant::now();
    let snapshots = crate::store::snapshot::SnapshotStore::open(meta.db())?;
    let definitions = crate::store::definitions::DefinitionStore::open(meta.db())?;
    let grid = Grid::start(
        settings.clone(),
        shards,
        registry,
        timers.clone(),
        snapshots,
        definitions,
        file_mappings,
    )
    .await
    .context("cannot recover the data dir")?;
    tracing::info!(
        shards,
        profiles = grid.registry.profile_count(),
        ms = started.elapsed().as_millis() as u64,
        "recovery finished"
    );
    let (stop_timers_tx, stop_timers_rx) = tokio::sync::oneshot::channel::<()>();
    if !clock.is_manual() {
        tokio::spawn(timers.clone().drive(async {
            let _ = stop_timers_rx.await;
        }));
    }
    let _ = state.services.set(Arc::new(Services {
        ingestor: Ingestor::new(grid.clone()),
        grid: grid.clone(),
        keys,
    }));
    tracing::info!(%local, "ready");

    shutdown.await;
    tracing::info!("shutting down: no new requests, finishing those in flight");
    let _ = stop_http_tx.send(());
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "http server error"),
        Err(e) => tracing::error!(error = %e, "http task failed"),
    }
    let _ = stop_timers_tx.send(());
    match grid.snapshot().await {
        Ok(m) => tracing::info!(snapshot = m.id, "final snapshot taken"),
        Err(e) => {
            tracing::error!(error = %e, "final snapshot failed; the log still holds everything")
        }
    }
    grid.shutdown().await;
    drop(meta);
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
