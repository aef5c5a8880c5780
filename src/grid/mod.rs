//! The actor grid: shard actors hosting profiles as virtual actors, the registry that
//! routes to them, the clock and timer service, and the trait-path catalog.
//!
//! [`Grid`] is the handle the rest of the server holds: it groups work by shard and sends
//! one actor message per shard per request (`do_send` with a oneshot reply). It owns
//! admission (a full shard queue becomes `overloaded` before anything is logged). It must
//! not parse HTTP or know about status codes.

pub mod catalog;
pub mod clock;
pub mod dispatch;
pub mod export;
pub mod mappings;
pub mod membership;
pub mod registry;
pub mod segment_actor;
pub mod segments;
pub mod shard;
pub mod snapshot;
pub mod timer;
pub mod triggers;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use actix::{Actor, Addr, Arbiter};
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::domain::ids::ProfileId;
use crate::domain::profile::Profile;
use crate::error::{ErrorCode, Problem};
use crate::store::log::{LogReader, LogRecord, Position};
use catalog::Catalog;
use clock::Clock;
use registry::Registry;
use shard::{
    ApplyBatch, ApplyItem, CountProfiles, DeleteProfile, EventFilter, EventHit, FlushLog,
    GetProfiles, ListProfiles, PatchTraits, QueryEvents, ReadTimeline, Shard, ShardContext,
    SweepRetention,
};
use timer::Timers;

/// Handle on the running grid; cheap to share behind an `Arc`.
pub struct Grid {
    /// Shard actors, indexed by shard number.
    shards: Vec<Addr<Shard>>,
    /// Messages queued per shard (admission control).
    depths: Vec<Arc<AtomicUsize>>,
    /// Per shard: its log could not be written (fail-stop until a restart).
    failed: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// The Arbiters (threads) the shards run on; kept to stop them at shutdown.
    arbiters: parking_lot::Mutex<Vec<Arbiter>>,
    /// Identity index and routing.
    pub registry: Arc<Registry>,
    /// Random-access reads of the logs.
    pub reader: Arc<LogReader>,
    /// Server time.
    pub clock: Arc<Clock>,
    /// Deferred actions.
    pub timers: Arc<Timers>,
    /// Settings in force.
    pub settings: Arc<Settings>,
    /// Trait paths seen.
    pub catalog: Arc<Catalog>,
    /// Next accept sequence number.
    pub next_seq: Arc<AtomicU64>,
    /// Accepted messageIds.
    pub dedup: Arc<crate::ingest::dedup::Dedup>,
    /// Where snapshots go.
    pub snapshots: crate::store::snapshot::SnapshotStore,
    /// One snapshot (or backup download) at a time.
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    /// Segment definitions, compiled rules and segment actors.
    pub segments: segments::Segments,
    /// Wall time of the last snapshot (periodic snapshots follow wall time).
    last_snapshot_wall: AtomicI64,
    /// Webhook delivery: one worker per trigger.
    pub dispatcher: dispatch::Dispatcher,
    /// What each mapping did since start.
    pub mapping_stats: Arc<mappings::MappingStats>,
    /// A catalog rebuild is scheduled.
    catalog_rebuild_due: std::sync::atomic::AtomicBool,
}

/// How long after an erasure the trait catalog is rebuilt (erasures meanwhile share it).
const CATALOG_REBUILD_DELAY_MS: u64 = 500;

/// The actor is gone: only during shutdown.
pub(crate) fn gone() -> Problem {
    Problem::new(ErrorCode::Unavailable, "the server is shutting down")
}

impl Grid {
    /// Opens every shard (replaying its log, in parallel) and starts each on its own
    /// Arbiter. Must run inside an actix `System`.
    pub async fn start(
        settings: Arc<Settings>,
        shard_count: u16,
        registry: Arc<Registry>,
        timers: Arc<Timers>,
        snapshots: crate::store::snapshot::SnapshotStore,
        definitions: crate::store::definitions::DefinitionStore,
        file_mappings: Vec<mappings::FileMapping>,
    ) -> anyhow::Result<Arc<Grid>> {
        let clock = timers.clock().clone();
        let d = &settings.dedup;
        let dedup = Arc::new(crate::ingest::dedup::Dedup::new(
            d.window_hours as i64 * 3_600_000,
            d.max_ids,
        ));
        let loaded = {
            let store = snapshots.clone();
            tokio::task::spawn_blocking(move || snapshot::load_newest(&store, shard_count))
                .await
                .expect("snapshot load task")?
        };
        let mut per_shard: Vec<Vec<_>> = (0..shard_count).map(|_| Vec::new()).collect();
        let mut start_seq = 1;
        let mut snapshot_definitions = None;
        if let Some(l) = loaded {
            snapshot_definitions = l.definitions;
            tracing::info!(
                snapshot = l.manifest.id,
                profiles = l.manifest.profiles(),
                "loading snapshot"
            );
            for (h, t) in l.dedup.ids {
                dedup.restore(h, t);
            }
            registry.suppress(&l.suppressed);
            start_seq = l.manifest.next_seq;
            per_shard = l.shards;
        }
        let segments =
            segments::Segments::open(definitions, snapshot_definitions, settings.stream.buffer)?;
        let (notify, changes) = tokio::sync::mpsc::unbounded_channel();
        let (dispatch_tx, dispatch_rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = Arc::new(LogReader::new(&settings.data_dir));
        let ctx = Arc::new(ShardContext {
            settings: settings.clone(),
            registry: registry.clone(),
            clock: clock.clone(),
            next_seq: {
                registry.seq.store(start_seq, Ordering::Release);
                registry.seq.clone()
            },
            catalog: Arc::new(Catalog::default()),
            data_dir: settings.data_dir.clone(),
            flusher: crate::store::flush::Flusher::start(),
            dedup: dedup.clone(),
            reader: reader.clone(),
            timers: timers.clone(),
            notify,
            dispatch: dispatch_tx,
            mapping_stats: Arc::new(mappings::MappingStats::default()),
        });
        let depths: Vec<Arc<AtomicUsize>> = (0..shard_count)
            .map(|_| Arc::new(AtomicUsize::new(0)))
            .collect();
        let failed: Vec<Arc<std::sync::atomic::AtomicBool>> = (0..shard_count)
            .map(|_| Arc::new(std::sync::atomic::AtomicBool::new(false)))
            .collect();
        let opened = {
            let ctx = ctx.clone();
            let depths = depths.clone();
            let failed = failed.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::scope(|s| {
                    let handles: Vec<_> = per_shard
                        .into_iter()
                        .enumerate()
                        .map(|(i, chunks)| {
                            let ctx = ctx.clone();
                            let depth = depths[i].clone();
                            let failed = failed[i].clone();
                            s.spawn(move || Shard::open(i as u16, ctx, depth, failed, chunks))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("shard open panicked"))
                        .collect::<std::io::Result<Vec<Shard>>>()
                })
            })
            .await
            .expect("shard open task")?
        };
        let mut arbiters = Vec::with_capacity(opened.len());
        let mut shards = Vec::with_capacity(opened.len());
        for shard in opened {
            let arbiter = Arbiter::new();
            shards.push(Shard::start_in_arbiter(&arbiter.handle(), move |_| shard));
            arbiters.push(arbiter);
        }
        let dispatcher = dispatch::Dispatcher::new(dispatch::DispatchContext {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(settings.triggers.max_concurrency.max(1))
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {e}"))?,
            clock: clock.clone(),
            timers: timers.clone(),
            history: crate::store::deliveries::HistoryStore::open(snapshots.db())?,
            settings: settings.triggers.clone(),
            end: dispatch::end_batcher(shards.clone()),
        });
        metrics::gauge!("user360_profiles").set(registry.profile_count() as f64);
        metrics::gauge!("user360_shards").set(shard_count as f64);
        let grid = Arc::new(Grid {
            shards,
            depths,
            failed,
            arbiters: parking_lot::Mutex::new(arbiters),
            registry,
            reader,
            clock,
            timers,
            catalog: ctx.catalog.clone(),
            next_seq: ctx.next_seq.clone(),
            dedup,
            snapshots,
            snapshot_lock: Arc::new(tokio::sync::Mutex::new(())),
            settings,
            segments,
            last_snapshot_wall: AtomicI64::new(clock::wall_ms()),
            dispatcher,
            mapping_stats: ctx.mapping_stats.clone(),
            catalog_rebuild_due: std::sync::atomic::AtomicBool::new(false),
        });
        grid.drop_absorbed().await;
        if !file_mappings.is_empty() {
            let n = grid.load_mapping_file(file_mappings)?;
            let file = grid.settings.mappings_file.display();
            tracing::info!(mappings = n, %file, "mappings file loaded");
        }
        grid.start_segments(changes).await;
        grid.start_dispatch(dispatch_rx).await;
        grid.schedule_retention();
        grid.schedule_snapshots();
        grid.watch_disk();
        Ok(grid)
    }

    /// The actor of one shard.
    pub fn shard(&self, i: u16) -> &Addr<Shard> {
        &self.shards[i as usize]
    }

    /// Holds off snapshots (and the pruning and log deletion they do) while held.
    pub async fn snapshot_guard(self: &Arc<Self>) -> tokio::sync::OwnedMutexGuard<()> {
        self.snapshot_lock.clone().lock_owned().await
    }

    /// Takes a snapshot now (one at a time).
    pub async fn snapshot(
        self: &Arc<Self>,
    ) -> Result<crate::store::snapshot::Manifest, crate::store::snapshot::SnapshotError> {
        let _one = self.snapshot_lock.lock().await;
        self.last_snapshot_wall
            .store(clock::wall_ms(), Ordering::Release);
        snapshot::take(self, &self.snapshots).await
    }

    /// Takes a snapshot every `snapshots.interval_seconds` of server time.
    fn schedule_snapshots(self: &Arc<Self>) {
        let every = self.settings.snapshots.interval_seconds as i64 * 1000;
        if every == 0 {
            return;
        }
        let weak = Arc::downgrade(self);
        self.timers.schedule(
            self.clock.now_ms() + every,
            Box::new(move |_| {
                Box::pin(async move {
                    if let Some(grid) = weak.upgrade() {
                        // A manual clock moved days ahead passes hundreds of these at once:
                        // snapshots bound recovery time, which is wall time, so take one
                        // only when the last is an interval of wall time old.
                        let wall = clock::wall_ms();
                        let last = grid.last_snapshot_wall.load(Ordering::Acquire);
                        if wall - last >= every
                            && let Err(e) = grid.snapshot().await
                        {
                            tracing::error!(error = %e, "periodic snapshot failed");
                        }
                        grid.schedule_snapshots();
                    }
                })
            }),
        );
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Every second of wall time, shards whose log failed try to recover (see
    /// [`shard::Recover`]). A background task rather than a timer: it waits for the disk,
    /// not for server time, so the manual test clock must not hold it back.
    fn watch_disk(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(grid) = weak.upgrade() else { return };
                let failed: Vec<u16> = (0..grid.failed.len() as u16)
                    .filter(|i| grid.failed[*i as usize].load(Ordering::Acquire))
                    .collect();
                if failed.is_empty() {
                    continue;
                }
                let store = grid.snapshots.clone();
                let n = grid.shard_count() as u16;
                let loaded = tokio::task::spawn_blocking(move || snapshot::load_newest(&store, n))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten();
                let mut per_shard = loaded.map(|l| l.shards).unwrap_or_default();
                for i in failed {
                    let chunks = per_shard
                        .get_mut(i as usize)
                        .map(std::mem::take)
                        .unwrap_or_default();
                    let (tx, rx) = oneshot::channel();
                    grid.shards[i as usize].do_send(shard::Recover {
                        snapshot: chunks,
                        reply: tx,
                    });
                    let _ = rx.await;
                }
            }
        });
    }

    /// Runs the retention sweep every hour of server time.
    fn schedule_retention(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let due = self.clock.now_ms() + 3_600_000;
        self.timers.schedule(
            due,
            Box::new(move |_| {
                Box::pin(async move {
                    if let Some(grid) = weak.upgrade() {
                        let mut dropped = 0;
                        for addr in &grid.shards {
                            let (tx, rx) = oneshot::channel();
                            addr.do_send(SweepRetention { reply: tx });
                            dropped += rx.await.unwrap_or(0);
                        }
                        if dropped > 0 {
                            tracing::info!(dropped, "retention sweep dropped events");
                        }
                        grid.schedule_retention();
                    }
                })
            }),
        );
    }

    /// Admission: refuses `n` more messages when any shard's queue is full, before
    /// anything of the request is resolved or logged.
    pub fn admit(&self, n: usize) -> Result<(), Problem> {
        self.healthy()?;
        let limit = self.settings.ingest.shard_queue_messages;
        for (i, d) in self.depths.iter().enumerate() {
            let depth = d.load(Ordering::Acquire);
            metrics::gauge!("user360_shard_queue_depth", "shard" => i.to_string())
                .set(depth as f64);
            if depth + n > limit.max(n) {
                return Err(Problem::new(
                    ErrorCode::Overloaded,
                    format!("shard {i} has {depth} messages queued (limit {limit}); retry shortly"),
                ));
            }
        }
        Ok(())
    }

    /// 503 while any shard's log cannot be written.
    pub fn healthy(&self) -> Result<(), Problem> {
        match self.failed.iter().position(|f| f.load(Ordering::Acquire)) {
            None => Ok(()),
            Some(i) => Err(Problem::new(
                ErrorCode::Unavailable,
                format!(
                    "shard {i} cannot write its log (disk full or failing); nothing is accepted until the server is restarted on a writable disk"
                ),
            )),
        }
    }

    /// Applies resolved messages: one actor message per shard, answers in item order.
    pub async fn apply(&self, items: Vec<ApplyItem>) -> Vec<(usize, Result<(), Problem>)> {
        let mut out = Vec::with_capacity(items.len());
        // Merges first: the absorbed profiles' data reaches the survivor before the message
        // that caused the merge is applied there.
        let mut ready = Vec::with_capacity(items.len());
        for item in items {
            if item.resolution.merged.is_empty() {
                ready.push(item);
                continue;
            }
            match self.merge(&item).await {
                Ok(()) => ready.push(item),
                Err(p) => out.push((item.index, Err(p))),
            }
        }
        let mut pending = ready;
        // Items for profiles merged away meanwhile come back re-targeted; a few rounds at most.
        for _ in 0..8 {
            if pending.is_empty() {
                break;
            }
            let mut by_shard: Vec<Vec<ApplyItem>> =
                (0..self.shards.len()).map(|_| Vec::new()).collect();
            for item in pending.drain(..) {
                by_shard[item.resolution.profile.shard() as usize].push(item);
            }
            let mut waits = Vec::new();
            for (i, items) in by_shard.into_iter().enumerate() {
                if items.is_empty() {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let indexes: Vec<usize> = items.iter().map(|it| it.index).collect();
                self.depths[i].fetch_add(items.len(), Ordering::AcqRel);
                self.shards[i].do_send(ApplyBatch { items, reply: tx });
                waits.push((indexes, rx));
            }
            for (indexes, rx) in waits {
                match rx.await {
                    Ok(outcome) => {
                        out.extend(outcome.done);
                        pending.extend(outcome.moved);
                    }
                    Err(_) => out.extend(indexes.into_iter().map(|i| (i, Err(gone())))),
                }
            }
        }
        out.extend(pending.into_iter().map(|i| (i.index, Err(gone()))));
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Moves each absorbed profile of a resolution into its survivor (cross-shard safe:
    /// the absorbed side hands over only after logging that it left, the survivor answers
    /// once the absorbed state is logged on its side).
    async fn merge(&self, item: &ApplyItem) -> Result<(), Problem> {
        self.merge_into(
            item.resolution.profile,
            &item.resolution.merged,
            &item.message.message_id,
            &item.message.identities,
        )
        .await
    }

    /// Moves each absorbed profile's state into `survivor` (see docs/identity.md).
    async fn merge_into(
        &self,
        survivor: ProfileId,
        merged: &[ProfileId],
        cause: &str,
        cause_identities: &[crate::domain::identity::Identity],
    ) -> Result<(), Problem> {
        let identities: Vec<serde_json::Value> = cause_identities
            .iter()
            .map(|i| serde_json::json!({"type": i.ty.name(), "value": &*i.value}))
            .collect();
        for absorbed in merged {
            let (tx, rx) = oneshot::channel();
            self.shards[absorbed.shard() as usize].do_send(shard::TakeProfile {
                profile: *absorbed,
                reply: tx,
            });
            // Not on its shard: the message creating it is still on its way, and will be
            // sent on to the survivor (see `ApplyBatch`). The merge is recorded all the same,
            // so `merged_from` and the forward survive restarts.
            let taken = rx.await.map_err(|_| gone())??;
            let held = taken.is_some();
            let state = taken.unwrap_or_else(|| Profile::new(*absorbed, self.clock.now_ms()));
            let mut into = survivor;
            loop {
                let keep = state.clone();
                let note = serde_json::json!({
                    "type": "merge",
                    "survivor": into.to_string(),
                    "absorbed": absorbed.to_string(),
                    "message_id": cause,
                    "identities": identities,
                    "rule": "a message carried identities of both profiles; the older profile survives",
                    "at": crate::segment::timefmt::format_ms(self.clock.now_ms()),
                });
                let (tx, rx) = oneshot::channel();
                self.shards[into.shard() as usize].do_send(shard::AbsorbProfile {
                    profile: into,
                    absorbed: keep,
                    note,
                    reply: tx,
                });
                match rx.await.map_err(|_| gone()).and_then(|r| r) {
                    Ok(None) => break,
                    // The survivor was itself merged away meanwhile: follow it.
                    Ok(Some(next)) => into = next,
                    Err(p) => {
                        if held {
                            self.shards[absorbed.shard() as usize]
                                .do_send(shard::ReturnProfile { profile: state });
                        }
                        return Err(p);
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            self.shards[absorbed.shard() as usize].do_send(shard::ConfirmMergedAway {
                profile: *absorbed,
                into,
                held,
                reply: tx,
            });
            rx.await.map_err(|_| gone())??;
        }
        Ok(())
    }

    /// After recovery: drops profiles that a survivor already absorbed but whose shard had
    /// not logged their departure before a crash.
    async fn drop_absorbed(&self) {
        let mut ids = Vec::new();
        for addr in &self.shards {
            let (tx, rx) = oneshot::channel();
            addr.do_send(shard::MergedIds { reply: tx });
            ids.extend(rx.await.unwrap_or_default());
        }
        if ids.is_empty() {
            return;
        }
        let ids = Arc::new(ids);
        let mut dropped = 0;
        for addr in &self.shards {
            let (tx, rx) = oneshot::channel();
            addr.do_send(shard::DropAbsorbed {
                ids: ids.clone(),
                reply: tx,
            });
            dropped += rx.await.unwrap_or(0);
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "dropped profiles absorbed by a merge whose last step a crash cut off"
            );
        }
    }

    /// A profile's segments: (id, name, since); None when it does not exist.
    pub async fn profile_segments(
        &self,
        id: ProfileId,
    ) -> Option<Vec<shard::segments::MembershipView>> {
        let (tx, rx) = oneshot::channel();
        self.shards
            .get(id.shard() as usize)?
            .do_send(shard::segments::ProfileSegments {
                profile: id,
                reply: tx,
            });
        rx.await.ok().flatten()
    }

    /// The merges that touched a profile (`GET /v1/profiles/{key}/merges`).
    pub async fn merges(&self, id: ProfileId) -> Option<Vec<String>> {
        let (tx, rx) = oneshot::channel();
        self.shards[id.shard() as usize].do_send(shard::GetMerges {
            profile: id,
            reply: tx,
        });
        rx.await.ok().flatten()
    }

    /// The API's profile object for an id.
    pub async fn profile_json(&self, id: ProfileId) -> Option<String> {
        let addr = self.shards.get(id.shard() as usize)?;
        let (tx, rx) = oneshot::channel();
        addr.do_send(GetProfiles {
            ids: vec![id],
            reply: tx,
        });
        rx.await.ok()?.pop().flatten()
    }

    /// Profile objects for many ids (one actor message per shard).
    pub async fn profiles_json(&self, ids: &[ProfileId]) -> Vec<Option<String>> {
        let mut by_shard: Vec<Vec<(usize, ProfileId)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (i, id) in ids.iter().enumerate() {
            if let Some(v) = by_shard.get_mut(id.shard() as usize) {
                v.push((i, *id));
            }
        }
        let mut out = vec![None; ids.len()];
        for (s, list) in by_shard.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.shards[s].do_send(GetProfiles {
                ids: list.iter().map(|(_, id)| *id).collect(),
                reply: tx,
            });
            if let Ok(found) = rx.await {
                for ((i, _), json) in list.into_iter().zip(found) {
                    out[i] = json;
                }
            }
        }
        out
    }

    /// Newest-first events of one profile; None when it does not exist.
    pub async fn timeline(
        &self,
        id: ProfileId,
        filter: EventFilter,
        limit: usize,
    ) -> Option<Vec<EventHit>> {
        let addr = self.shards.get(id.shard() as usize)?;
        let (tx, rx) = oneshot::channel();
        addr.do_send(ReadTimeline {
            profile: id,
            filter,
            limit,
            reply: tx,
        });
        rx.await.ok().flatten()
    }

    /// Newest-first events across all profiles (each shard returns its best `limit`).
    pub async fn query_events(&self, filter: EventFilter, limit: usize) -> Vec<EventHit> {
        let mut waits = Vec::with_capacity(self.shards.len());
        for addr in &self.shards {
            let (tx, rx) = oneshot::channel();
            addr.do_send(QueryEvents {
                filter: filter.clone(),
                limit,
                reply: tx,
            });
            waits.push(rx);
        }
        let mut all = Vec::new();
        for rx in waits {
            all.extend(rx.await.unwrap_or_default());
        }
        all.sort_by_key(|h| std::cmp::Reverse((h.ts_ms, h.seq)));
        all.truncate(limit);
        all
    }

    /// Reads a stored event's JSON (without `profile_id`).
    pub fn read_event(&self, pos: Position) -> std::io::Result<String> {
        match self.reader.read(pos)? {
            LogRecord::Event(e) => Ok(e.json),
            LogRecord::Membership(m) => Ok(membership::render_membership(&m)),
            LogRecord::System(r) => Ok(shard::expand_system(&r).json),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "position {pos} holds a {:?} record, not an event",
                    other.seq()
                ),
            )),
        }
    }

    /// Profile ids in ascending order after `after` (k-way merge of the shards' ranges),
    /// optionally only members of a segment.
    pub async fn list_profiles(
        &self,
        segment: Option<crate::segment::compile::SegIdx>,
        after: Option<ProfileId>,
        limit: usize,
    ) -> Vec<ProfileId> {
        let mut waits = Vec::with_capacity(self.shards.len());
        for addr in &self.shards {
            let (tx, rx) = oneshot::channel();
            addr.do_send(ListProfiles {
                segment,
                after,
                limit,
                reply: tx,
            });
            waits.push(rx);
        }
        let mut all = Vec::new();
        for rx in waits {
            all.extend(rx.await.unwrap_or_default());
        }
        all.sort_unstable();
        all.truncate(limit);
        all
    }

    /// Number of profiles across shards.
    pub async fn count_profiles(&self) -> usize {
        let mut total = 0;
        for addr in &self.shards {
            let (tx, rx) = oneshot::channel();
            addr.do_send(CountProfiles { reply: tx });
            total += rx.await.unwrap_or(0);
        }
        total
    }

    /// Sets traits on a resolved profile; answers the profile object.
    pub async fn patch_traits(
        &self,
        resolution: registry::Resolution,
        traits: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, Problem> {
        let addr = &self.shards[resolution.profile.shard() as usize];
        let note =
            registry::refused_links_note(&resolution.dropped_ids, "patch", self.clock.now_ms());
        let (tx, rx) = oneshot::channel();
        addr.do_send(PatchTraits {
            resolution,
            note,
            traits,
            reply: tx,
        });
        rx.await.map_err(|_| gone())?
    }

    /// Erases a profile (with `suppress`, its identities are refused from then on); false
    /// when it did not exist.
    pub async fn delete_profile(
        self: &Arc<Self>,
        id: ProfileId,
        suppress: bool,
    ) -> Result<bool, Problem> {
        let addr = &self.shards[id.shard() as usize];
        let (tx, rx) = oneshot::channel();
        addr.do_send(DeleteProfile {
            profile: id,
            suppress,
            reply: tx,
        });
        let erased = rx.await.map_err(|_| gone())??;
        if erased {
            self.rebuild_catalog_soon();
            // Failed deliveries keep their payload for re-queuing: not the traits of
            // someone erased.
            let history = self.dispatcher.context().history.clone();
            let _ = tokio::task::spawn_blocking(move || {
                history.rewrite_bodies(id.0, shard::outbox::without_traits)
            })
            .await;
        }
        Ok(erased)
    }

    /// After an erasure: trait paths only the erased person held leave the catalog (the
    /// CSV export's default columns). One rebuild for a burst of erasures, a moment later:
    /// it asks every shard for the paths its profiles hold.
    fn rebuild_catalog_soon(self: &Arc<Self>) {
        if self.catalog_rebuild_due.swap(true, Ordering::SeqCst) {
            return;
        }
        let grid = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(CATALOG_REBUILD_DELAY_MS)).await;
            grid.catalog_rebuild_due.store(false, Ordering::SeqCst);
            grid.catalog.begin_rebuild();
            let mut held = std::collections::HashSet::new();
            for addr in &grid.shards {
                let (tx, rx) = oneshot::channel();
                addr.do_send(shard::TraitPaths { reply: tx });
                match rx.await {
                    Ok(paths) => held.extend(paths),
                    // A shard that cannot answer: keep every path.
                    Err(_) => {
                        held.extend(grid.catalog.sorted());
                        break;
                    }
                }
            }
            let removed = grid.catalog.finish_rebuild(&held);
            tracing::debug!(removed, "trait catalog rebuilt after an erasure");
        });
    }

    /// Flushes every shard's log to disk and stops the shard threads (shutdown).
    pub async fn shutdown(&self) {
        for (i, addr) in self.shards.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            addr.do_send(FlushLog { reply: tx });
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(shard = i, error = %e, "final flush failed"),
                Err(_) => tracing::warn!(shard = i, "shard already stopped"),
            }
        }
        for a in self.arbiters.lock().drain(..) {
            a.stop();
        }
    }
}

impl Grid {
    /// The profile a key names, if any.
    pub fn find(&self, key: &crate::domain::identity::ProfileKey) -> Option<ProfileId> {
        use crate::domain::identity::ProfileKey;
        match key {
            ProfileKey::Id(id) if self.registry.exists(*id) => Some(*id),
            ProfileKey::Id(id) => self.registry.forward(*id),
            ProfileKey::Identity(i) => self.registry.lookup(i),
            ProfileKey::Nothing => None,
        }
    }

    /// `PATCH /v1/profiles/{key}/traits`: creates the profile for an identity key, links
    /// `email`/`phone` traits as identities (ingest rules), then sets the traits.
    pub async fn patch_by_key(
        &self,
        key: &crate::domain::identity::ProfileKey,
        traits: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, Problem> {
        use crate::domain::identity::{IdType, Identity, ProfileKey, normalize};
        let now = self.clock.now_ms();
        let not_found = || {
            Problem::new(
                ErrorCode::NotFound,
                format!("no profile holds the key {}", key.describe()),
            )
        };
        let mut extra = Vec::new();
        for (name, ty) in [("email", IdType::EMAIL), ("phone", IdType::PHONE)] {
            if let Some(serde_json::Value::String(v)) = traits.get(name)
                && let Some(v) = normalize(ty, v)
                && !self.registry.rules().is_blocked(ty, &v)
            {
                extra.push(Identity {
                    ty,
                    value: v.into_boxed_str(),
                });
            }
        }
        // A value that never becomes an identity ("null", "0", ...) does not as a key either.
        if let ProfileKey::Identity(id) = key
            && self.registry.rules().is_blocked(id.ty, &id.value)
        {
            return Err(Problem::at(
                ErrorCode::BlockedId,
                "key",
                format!(
                    "{} {:?} is a blocked value (identity.blocked or a value SDKs send by \
                     mistake): it never becomes an identity",
                    id.ty.name(),
                    &*id.value
                ),
            ));
        }
        // A person erased with suppression is not brought back by a PATCH either: not
        // through its key, nor by an email/phone trait given to someone else.
        if let ProfileKey::Identity(id) = key
            && self
                .registry
                .suppressed_among(std::slice::from_ref(id))
                .is_some()
        {
            return Err(Problem::at(
                ErrorCode::Suppressed,
                "key",
                format!(
                    "{} {:?} belongs to a person erased with suppression",
                    id.ty.name(),
                    &*id.value
                ),
            ));
        }
        if let Some(id) = self.registry.suppressed_among(&extra) {
            return Err(Problem::at(
                ErrorCode::Suppressed,
                id.ty.name(),
                format!(
                    "trait {} {:?} belongs to a person erased with suppression",
                    id.ty.name(),
                    &*id.value
                ),
            ));
        }
        let resolution = match (key, self.find(key)) {
            // An identity key: it and the email/phone traits resolve together, like the
            // identities of a message (creating, linking or merging under the limits).
            (ProfileKey::Identity(id), _) => {
                let mut ids = vec![id.clone()];
                ids.extend(extra);
                let r = self
                    .registry
                    .resolve_keeping_first(&ids, now)
                    .map_err(|e| Problem::new(ErrorCode::MissingId, e.to_string()))?;
                if !r.merged.is_empty() {
                    let cause = format!("patch:{}", crate::segment::timefmt::format_ms(now));
                    self.merge_into(r.profile, &r.merged, &cause, &ids).await?;
                }
                r
            }
            (_, Some(pid)) => {
                let linked = if extra.is_empty() {
                    Vec::new()
                } else {
                    self.registry.link_onto(pid, &extra, now)
                };
                registry::Resolution {
                    linked,
                    ..registry::Resolution::to(pid)
                }
            }
            _ => return Err(not_found()),
        };
        self.patch_traits(resolution, traits).await
    }
}
