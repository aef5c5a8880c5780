//! Segments as a service: definitions (create, replace, delete, list) kept durable, the
//! compiled [`RuleSet`] every shard evaluates, backfills of created or changed segments
//! across shards in parallel while ingest goes on, the segment actors that receive
//! membership changes, and the membership reads (members, ad-hoc queries, previews).
//!
//! Edits are serialised: one edit (and the backfill it starts) at a time, so every shard
//! sees rule sets in the same order. Readers never wait for an edit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::Grid;
use super::membership::{AdHocRule, MembershipChanged, Reason};
use super::segment_actor::SegmentActor;
use super::shard::segments::{BackfillSlice, InstallRules, ListMembers, MatchRule};
use crate::domain::ids::ProfileId;
use crate::error::{ErrorCode, Problem};
use crate::segment::compile::{Resolver, SegIdx, SpecId, compile};
use crate::segment::counter::CounterSpec;
use crate::segment::rule::Rule;
use crate::segment::set::{Definitions, RuleSet, SegmentDef, SegmentStatus};
use crate::segment::timefmt::format_ms;
use crate::store::definitions::DefinitionStore;

/// Profiles per backfill slice: a slice holds its shard for about a millisecond.
const BACKFILL_SLICE: usize = 2048;

/// What an edit of the definitions asks of the shards.
#[derive(Debug, Default)]
pub(crate) struct Edit {
    /// A created or changed segment to backfill.
    pub backfill: Option<SegIdx>,
    /// A new trigger (and its segment) whose current members are queued.
    pub send_existing: Option<(u32, SegIdx)>,
}

impl Edit {
    fn backfill(idx: SegIdx) -> Edit {
        Edit {
            backfill: Some(idx),
            send_existing: None,
        }
    }
}

/// The segment state of a running server.
pub struct Segments {
    /// Where definitions are kept.
    store: DefinitionStore,
    /// The definitions readers see (replaced whole by edits).
    current: parking_lot::RwLock<Arc<Definitions>>,
    /// The compiled rules in force.
    rules: parking_lot::RwLock<Arc<RuleSet>>,
    /// Serialises edits and the backfills they start.
    edits: Arc<tokio::sync::Mutex<()>>,
    /// Rule-set versions.
    version: AtomicU64,
    /// The actor of each segment.
    actors: DashMap<SegIdx, SegmentActor>,
    /// Changes kept per segment for stream resumption.
    buffer: usize,
}

/// A segment's API object.
fn segment_json(d: &SegmentDef, count: i64) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "description": d.description,
        "rule": d.rule,
        "status": d.status,
        "count": count.max(0),
        "created_at": format_ms(d.created_at),
        "updated_at": format_ms(d.updated_at),
    })
}

fn rule_problem(e: crate::segment::cond::CondError) -> Problem {
    Problem::at(ErrorCode::InvalidRule, e.path, e.message)
}

/// The fields of a segment body (POST or PUT), validated.
struct SegmentInput {
    id: Option<String>,
    name: String,
    description: Option<String>,
    rule: Value,
}

/// True for an id users may give a segment.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn parse_input(body: &Value) -> Result<SegmentInput, Problem> {
    let Some(obj) = body.as_object() else {
        return Err(Problem::at(
            ErrorCode::InvalidField,
            "",
            format!(
                "a segment must be a JSON object with \"name\" and \"rule\"; got {}",
                crate::segment::cond::show(body)
            ),
        ));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "name" | "description" | "rule"))
    {
        return Err(Problem::at(
            ErrorCode::InvalidRule,
            k.as_str(),
            format!("unknown key {k:?} in a segment; expected id, name, description, rule"),
        ));
    }
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_id(s) => Some(s.clone()),
        Some(other) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "id",
                format!(
                    "a segment id is 1 to 64 letters, digits, '_', '-' or '.'; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
    };
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "name",
                format!(
                    "\"name\" must be a non-empty string; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
        None => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "name",
                "a segment needs a \"name\"",
            ));
        }
    };
    let description = match obj.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "description",
                format!(
                    "\"description\" must be a string; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
    };
    let Some(rule) = obj.get("rule") else {
        return Err(Problem::at(
            ErrorCode::InvalidRule,
            "rule",
            "a segment needs a \"rule\"",
        ));
    };
    Rule::parse(rule, "rule").map_err(rule_problem)?;
    Ok(SegmentInput {
        id,
        name,
        description,
        rule: rule.clone(),
    })
}

impl Segments {
    /// Loads the definitions (from the data dir, else from the snapshot recovery started
    /// from) and compiles them. Actors start in [`Grid::start_segments`].
    pub fn open(
        store: DefinitionStore,
        from_snapshot: Option<String>,
        buffer: usize,
    ) -> anyhow::Result<Segments> {
        let text = match store.load()? {
            Some(t) => Some(t),
            None => from_snapshot,
        };
        let mut defs: Definitions = match text {
            Some(t) => serde_json::from_str(&t).map_err(|e| {
                anyhow::anyhow!("the stored segment definitions are unreadable: {e}")
            })?,
            None => Definitions::default(),
        };
        let rules = RuleSet::build(&mut defs, 1, &|_| None).map_err(|(id, e)| {
            anyhow::anyhow!("the stored segment {id:?} no longer compiles: {e}")
        })?;
        Ok(Segments {
            store,
            current: parking_lot::RwLock::new(Arc::new(defs)),
            rules: parking_lot::RwLock::new(Arc::new(rules)),
            edits: Arc::new(tokio::sync::Mutex::new(())),
            version: AtomicU64::new(1),
            actors: DashMap::new(),
            buffer,
        })
    }

    /// The compiled rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.read().clone()
    }

    /// The definitions in force.
    pub fn definitions(&self) -> Arc<Definitions> {
        self.current.read().clone()
    }

    /// The definitions in force (for snapshots and backups).
    pub fn definitions_json(&self) -> String {
        serde_json::to_string(&**self.current.read()).expect("definitions serialise")
    }

    /// The actor of a segment.
    pub fn actor(&self, idx: SegIdx) -> Option<SegmentActor> {
        self.actors.get(&idx).map(|a| a.clone())
    }

    /// The segment with an API id, and its index.
    pub fn find(&self, id: &str) -> Option<SegIdx> {
        self.current.read().segment(id).map(|s| s.idx)
    }

    fn count(&self, idx: SegIdx) -> i64 {
        self.rules
            .read()
            .get(idx)
            .map_or(0, |r| r.count.load(Ordering::Acquire))
    }

    /// Routes durable membership changes to their segments' actors, one message per
    /// segment per batch.
    fn deliver(&self, changes: Vec<MembershipChanged>) {
        let mut by_segment: HashMap<SegIdx, Vec<MembershipChanged>> = HashMap::new();
        for c in changes {
            by_segment.entry(c.segment).or_default().push(c);
        }
        for (seg, batch) in by_segment {
            if let Some(a) = self.actors.get(&seg) {
                a.changed(batch);
            }
        }
    }

    /// Changes the definitions before the grid serves (the mappings file at start):
    /// compiles and saves them; the start's install puts them in force.
    pub(crate) fn edit_offline(&self, change: impl FnOnce(&mut Definitions)) -> anyhow::Result<()> {
        let mut defs = (**self.current.read()).clone();
        change(&mut defs);
        let rules = self
            .compile(&mut defs)
            .map_err(|(id, p)| anyhow::anyhow!("{id}: {}", p.message))?;
        self.save(&defs).map_err(|p| anyhow::anyhow!(p.message))?;
        *self.current.write() = Arc::new(defs);
        *self.rules.write() = Arc::new(rules);
        Ok(())
    }

    /// Compiles the definitions `defs` into a new rule set, keeping member counts.
    fn compile(&self, defs: &mut Definitions) -> Result<RuleSet, (String, Problem)> {
        let old = self.rules();
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        RuleSet::build(defs, version, &|idx| old.get(idx).map(|r| r.count.clone()))
            .map_err(|(id, e)| (id, rule_problem(e)))
    }

    fn save(&self, defs: &Definitions) -> Result<(), Problem> {
        let text = serde_json::to_string(defs).expect("definitions serialise");
        self.store.save(&text).map_err(|e| {
            tracing::error!(error = %e, "cannot save segment definitions");
            Problem::new(
                ErrorCode::Unavailable,
                format!("cannot save the definitions: {e}"),
            )
        })
    }
}

/// Compiles ad-hoc rules against the segments in force: counters the shards keep are
/// read as they are, others are recounted per profile.
struct AdHocResolver<'a> {
    defs: &'a Definitions,
    rules: &'a RuleSet,
    recount: Vec<(SpecId, Arc<CounterSpec>)>,
}

impl Resolver for AdHocResolver<'_> {
    fn segment(&mut self, id: &str) -> Option<SegIdx> {
        self.defs.segment(id).map(|s| s.idx)
    }

    fn spec(&mut self, spec: CounterSpec) -> (SpecId, Arc<CounterSpec>) {
        let key = spec.key();
        // A kept counter of the same events keeping at least as many times answers it.
        if let Some((id, s)) = self
            .rules
            .specs
            .iter()
            .find(|(_, s)| s.base_key() == spec.base_key() && s.keep >= spec.keep)
        {
            return (*id, s.clone());
        }
        if let Some((id, s)) = self.recount.iter().find(|(_, s)| s.key() == key) {
            return (*id, s.clone());
        }
        // Ids no kept counter has (kept ones count up from 0).
        let id = u32::MAX - self.recount.len() as u32;
        let s = Arc::new(spec);
        self.recount.push((id, s.clone()));
        (id, s)
    }
}

impl Grid {
    /// After recovery: starts the segment actors, puts the rules in force on every shard
    /// (which re-evaluates replayed profiles and plans time re-checks), and resumes any
    /// backfill a restart cut short.
    pub async fn start_segments(
        self: &Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<Vec<MembershipChanged>>,
    ) {
        let segs = &self.segments;
        let defs = segs.current.read().clone();
        for d in &defs.segments {
            segs.actors
                .insert(d.idx, SegmentActor::start(d.idx, segs.buffer));
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(batch) = changes.recv().await {
                let Some(grid) = weak.upgrade() else { return };
                grid.segments.deliver(batch);
            }
        });
        let pending: Vec<SegIdx> = defs
            .segments
            .iter()
            .filter(|d| d.status == SegmentStatus::Backfilling)
            .map(|d| d.idx)
            .collect();
        let guard = segs.edits.clone().lock_owned().await;
        let backfill = (!pending.is_empty()).then_some((pending, Reason::Rule));
        self.dispatcher.start_workers(&defs.triggers);
        if let Err(p) = self.install(backfill.clone(), None, true).await {
            tracing::error!(error = %p.message, "cannot put the segment rules in force");
            return;
        }
        if backfill.is_some() {
            tracing::info!("resuming segment backfills a restart cut short");
            self.spawn_backfill(guard);
        }
    }

    /// Sends the rules in force to every shard; answers once every shard has them durably.
    async fn install(
        &self,
        backfill: Option<(Vec<SegIdx>, Reason)>,
        send_existing: Option<(u32, SegIdx)>,
        startup: bool,
    ) -> Result<(), Problem> {
        let rules = self.segments.rules();
        let mut waits = Vec::new();
        for i in 0..self.shard_count() as u16 {
            let (tx, rx) = oneshot::channel();
            self.shard(i).do_send(InstallRules {
                rules: rules.clone(),
                backfill: backfill.clone(),
                send_existing,
                startup,
                reply: tx,
            });
            waits.push(rx);
        }
        for rx in waits {
            rx.await.map_err(|_| super::gone())??;
        }
        Ok(())
    }

    /// Runs the backfill the last install started, on every shard in parallel, then marks
    /// its segments ready. Holds the edit lock until done.
    fn spawn_backfill(self: &Arc<Self>, guard: tokio::sync::OwnedMutexGuard<()>) {
        let grid = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let shards = (0..grid.shard_count() as u16).map(|i| {
                let grid = grid.clone();
                async move {
                    loop {
                        let (tx, rx) = oneshot::channel();
                        grid.shard(i).do_send(BackfillSlice {
                            max: BACKFILL_SLICE,
                            reply: tx,
                        });
                        match rx.await {
                            Ok(Ok(true)) => return Ok(()),
                            Ok(Ok(false)) => {}
                            Ok(Err(p)) => return Err(p),
                            Err(_) => return Err(super::gone()),
                        }
                    }
                }
            });
            let results = futures_util::future::join_all(shards).await;
            if let Some(Err(p)) = results.into_iter().find(|r| r.is_err()) {
                tracing::error!(error = %p.message, "segment backfill failed; it resumes at the next start");
                drop(guard);
                return;
            }
            let segs = &grid.segments;
            let mut defs = (**segs.current.read()).clone();
            let mut ready = Vec::new();
            for d in defs.segments.iter_mut() {
                if d.status == SegmentStatus::Backfilling {
                    d.status = SegmentStatus::Ready;
                    ready.push(d.id.clone());
                }
            }
            if let Err(p) = segs.save(&defs) {
                tracing::error!(error = %p.message, "cannot mark segments ready");
            } else {
                *segs.current.write() = Arc::new(defs);
            }
            tracing::info!(segments = ?ready, ms = started.elapsed().as_millis() as u64, "segment backfill finished");
            drop(guard);
        });
    }

    /// Applies an edit of the definitions: compiles, saves, installs on every shard and
    /// starts the backfill of the segment it changed (with `reason`). Answers the edited
    /// definitions.
    pub(crate) async fn edit(
        self: &Arc<Self>,
        change: impl FnOnce(&mut Definitions) -> Result<Edit, Problem>,
        reason: Reason,
    ) -> Result<(Arc<Definitions>, Option<SegIdx>), Problem> {
        let guard = self.segments.edits.clone().lock_owned().await;
        let segs = &self.segments;
        let mut defs = (**segs.current.read()).clone();
        let Edit {
            backfill: changed,
            send_existing,
        } = change(&mut defs)?;
        let rules = segs.compile(&mut defs).map_err(|(_, p)| p)?;
        segs.save(&defs)?;
        let defs = Arc::new(defs);
        *segs.current.write() = defs.clone();
        *segs.rules.write() = Arc::new(rules);
        for d in &defs.segments {
            segs.actors
                .entry(d.idx)
                .or_insert_with(|| SegmentActor::start(d.idx, segs.buffer));
        }
        segs.actors
            .retain(|idx, _| defs.segments.iter().any(|d| d.idx == *idx));
        // Workers of new triggers exist before any shard makes deliveries for them; those
        // of deleted ones stop once no shard does.
        self.dispatcher.start_workers(&defs.triggers);
        let backfill = changed.map(|idx| (vec![idx], reason));
        self.install(backfill.clone(), send_existing, false).await?;
        self.dispatcher.retain_workers(&defs.triggers);
        if backfill.is_some() {
            self.spawn_backfill(guard);
        }
        Ok((defs, changed))
    }

    /// `POST /v1/segments`.
    pub async fn create_segment(self: &Arc<Self>, body: &Value) -> Result<Value, Problem> {
        let input = parse_input(body)?;
        let now = self.clock.now_ms();
        let id = input
            .id
            .clone()
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let (defs, idx) = self
            .edit(
                |defs| {
                    if defs.segment(&id).is_some() {
                        return Err(Problem::at(
                            ErrorCode::Conflict,
                            "id",
                            format!("a segment with the id {id:?} already exists"),
                        ));
                    }
                    let idx = defs.next_idx;
                    defs.next_idx += 1;
                    defs.segments.push(SegmentDef {
                        idx,
                        id: id.clone(),
                        name: input.name,
                        description: input.description,
                        rule: input.rule,
                        status: SegmentStatus::Backfilling,
                        created_at: now,
                        updated_at: now,
                    });
                    Ok(Edit::backfill(idx))
                },
                Reason::Rule,
            )
            .await?;
        let d = defs
            .segments
            .iter()
            .find(|d| Some(d.idx) == idx)
            .expect("created segment");
        Ok(segment_json(d, self.segments.count(d.idx)))
    }

    /// `PUT /v1/segments/{id}`: replaces name, description and rule; memberships change
    /// for the difference (reason `segment_changed`).
    pub async fn replace_segment(
        self: &Arc<Self>,
        id: &str,
        body: &Value,
    ) -> Result<Value, Problem> {
        let input = parse_input(body)?;
        if let Some(given) = &input.id
            && given != id
        {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "id",
                format!("the body's id {given:?} differs from the path's {id:?}"),
            ));
        }
        let now = self.clock.now_ms();
        let (defs, idx) = self
            .edit(
                |defs| {
                    let Some(d) = defs.segments.iter_mut().find(|d| d.id == id) else {
                        return Err(Problem::new(
                            ErrorCode::NotFound,
                            format!("no segment has the id {id:?}"),
                        ));
                    };
                    d.name = input.name;
                    d.description = input.description;
                    d.rule = input.rule;
                    d.status = SegmentStatus::Backfilling;
                    d.updated_at = now;
                    Ok(Edit::backfill(d.idx))
                },
                Reason::SegmentChanged,
            )
            .await?;
        let d = defs
            .segments
            .iter()
            .find(|d| Some(d.idx) == idx)
            .expect("replaced segment");
        Ok(segment_json(d, self.segments.count(d.idx)))
    }

    /// `DELETE /v1/segments/{id}`: 409 while another segment refers to it.
    pub async fn delete_segment(self: &Arc<Self>, id: &str) -> Result<(), Problem> {
        self.edit(
            |defs| {
                let Some(pos) = defs.segments.iter().position(|d| d.id == id) else {
                    return Err(Problem::new(
                        ErrorCode::NotFound,
                        format!("no segment has the id {id:?}"),
                    ));
                };
                let users: Vec<String> = defs
                    .segments
                    .iter()
                    .filter(|d| {
                        d.id != id
                            && Rule::parse(&d.rule, "rule")
                                .is_ok_and(|r| r.segment_refs().contains(&id))
                    })
                    .map(|d| d.id.clone())
                    .collect();
                let triggers: Vec<String> = defs
                    .triggers
                    .iter()
                    .filter(|t| t.segment == id)
                    .map(|t| format!("trigger {:?}", t.id))
                    .collect();
                let users: Vec<String> = users
                    .iter()
                    .map(|u| format!("segment {u:?}"))
                    .chain(triggers)
                    .collect();
                if !users.is_empty() {
                    return Err(Problem::new(
                        ErrorCode::Conflict,
                        format!(
                            "segment {id:?} is referred to by {}; change or delete them first",
                            users.join(", ")
                        ),
                    ));
                }
                defs.segments.remove(pos);
                Ok(Edit::default())
            },
            Reason::Rule,
        )
        .await?;
        Ok(())
    }

    /// `GET /v1/segments/{id}`.
    pub fn segment(&self, id: &str) -> Option<Value> {
        let defs = self.segments.current.read().clone();
        let d = defs.segment(id)?;
        Some(segment_json(d, self.segments.count(d.idx)))
    }

    /// `GET /v1/segments`: by ascending id after `after`.
    pub fn list_segments(&self, after: Option<&str>, limit: usize) -> (Vec<Value>, Option<String>) {
        let defs = self.segments.current.read().clone();
        let mut all: Vec<&SegmentDef> = defs
            .segments
            .iter()
            .filter(|d| after.is_none_or(|a| d.id.as_str() > a))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more {
            all.last().map(|d| d.id.clone())
        } else {
            None
        };
        (
            all.into_iter()
                .map(|d| segment_json(d, self.segments.count(d.idx)))
                .collect(),
            next,
        )
    }

    /// A page of a segment's members (ascending id); None when no such segment.
    pub async fn members(
        &self,
        id: &str,
        after: Option<ProfileId>,
        limit: usize,
    ) -> Option<(Vec<String>, Option<ProfileId>)> {
        let idx = self.segments.find(id)?;
        let mut all = Vec::new();
        for i in 0..self.shard_count() as u16 {
            let (tx, rx) = oneshot::channel();
            self.shard(i).do_send(ListMembers {
                segment: idx,
                after,
                limit: limit + 1,
                reply: tx,
            });
            all.extend(rx.await.unwrap_or_default());
        }
        all.sort_by_key(|(id, _)| *id);
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more {
            all.last().map(|(id, _)| *id)
        } else {
            None
        };
        Some((all.into_iter().map(|(_, j)| j).collect(), next))
    }

    /// Compiles an ad-hoc rule (queries, previews); errors point into `rule`.
    fn ad_hoc(&self, rule: &Value) -> Result<Arc<AdHocRule>, Problem> {
        let parsed = Rule::parse(rule, "rule").map_err(rule_problem)?;
        let defs = self.segments.current.read().clone();
        let rules = self.segments.rules();
        let mut r = AdHocResolver {
            defs: &defs,
            rules: &rules,
            recount: Vec::new(),
        };
        let compiled = compile(&parsed, &mut r).map_err(rule_problem)?;
        Ok(Arc::new(AdHocRule {
            root: compiled.root,
            recount: r.recount,
        }))
    }

    /// Profiles matching an ad-hoc rule: (ids ascending after `after`, up to `limit`;
    /// total matches when `count_all`; whether the query timeout cut it short).
    pub async fn match_rule(
        &self,
        rule: &Value,
        after: Option<ProfileId>,
        limit: usize,
        count_all: bool,
    ) -> Result<(Vec<ProfileId>, u64, bool), Problem> {
        let rule = self.ad_hoc(rule)?;
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_millis(self.settings.query.timeout_ms);
        let mut waits = Vec::new();
        for i in 0..self.shard_count() as u16 {
            let (tx, rx) = oneshot::channel();
            self.shard(i).do_send(MatchRule {
                rule: rule.clone(),
                after,
                limit,
                count_all,
                deadline,
                reply: tx,
            });
            waits.push(rx);
        }
        let mut ids = Vec::new();
        let mut count = 0;
        let mut partial = false;
        for rx in waits {
            let (i, c, p) = rx.await.map_err(|_| super::gone())?;
            ids.extend(i);
            count += c;
            partial |= p;
        }
        ids.sort_unstable();
        ids.truncate(limit);
        Ok((ids, count, partial))
    }
}

/// Parses a JSON request body that must be an object (segments, queries).
pub fn object_body(bytes: &[u8]) -> Result<Map<String, Value>, Problem> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(Problem::at(
            ErrorCode::InvalidField,
            "",
            format!(
                "the body must be a JSON object; got {}",
                crate::segment::cond::show(&other)
            ),
        )),
        Err(e) => Err(Problem::new(
            ErrorCode::InvalidJson,
            format!("the body is not JSON: {e}"),
        )),
    }
}
