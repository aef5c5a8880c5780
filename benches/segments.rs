//! Segment benchmarks: compiled rule evaluation (trait and event rules), and a shard-like
//! backfill pass (evaluate one rule over many in-memory profiles) — each beside a baseline
//! in the same run so figures are ratios.
//!
//! `cargo bench --bench segments`. Whole-server figures (ingest with 100 segments, backfill
//! of a million profiles over HTTP) come from `benches/segments.sh`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

use user360::domain::ids::ProfileId;
use user360::domain::profile::{Profile, TraitLimits, TraitTime};
use user360::segment::compile::{Resolver, SegIdx, SpecId, compile};
use user360::segment::counter::CounterSpec;
use user360::segment::rule::Rule;

/// Resolves specs to ids 0, 1, ... and no segments.
#[derive(Default)]
struct Specs(Vec<Arc<CounterSpec>>);

impl Resolver for Specs {
    fn segment(&mut self, _: &str) -> Option<SegIdx> {
        None
    }
    fn spec(&mut self, spec: CounterSpec) -> (SpecId, Arc<CounterSpec>) {
        self.0.push(Arc::new(spec));
        ((self.0.len() - 1) as SpecId, self.0.last().unwrap().clone())
    }
}

fn profile(i: u64) -> Profile {
    let limits = TraitLimits {
        max_keys: 1000,
        max_bytes: 256 * 1024,
        same_time_ms: 1000,
    };
    let mut p = Profile::new(ProfileId::new(1_800_000_000_000, 0, i), 1);
    let plan = ["free", "pro", "team"][(i % 3) as usize];
    let country = ["IN", "US"][(i % 2) as usize];
    let traits: serde_json::Map<String, serde_json::Value> = serde_json::from_value(json!({
        "plan": plan, "seats": i % 50, "country": country,
        "name": format!("User {i}"), "email": format!("u{i}@example.com"), "tags": ["beta", "vip"],
        "age": 20 + i % 40, "city": "Pune", "score": (i % 100) as f64 / 3.0, "active": true
    }))
    .unwrap();
    let plan = p.plan_traits(&traits, TraitTime::Event(1), limits).unwrap();
    p.commit_traits(plan, 1);
    p
}

fn evaluation(c: &mut Criterion) {
    let mut specs = Specs::default();
    // Five trait conditions of different operators, all true for the profile below.
    let rule = Rule::parse(
        &json!({"all": [
            {"trait": "plan", "op": "eq", "value": "pro"},
            {"trait": "seats", "op": "gte", "value": 3},
            {"trait": "country", "op": "in", "value": ["IN", "LK"]},
            {"trait": "tags", "op": "contains", "value": "vip"},
            {"trait": "email", "op": "exists"}
        ]}),
        "rule",
    )
    .unwrap();
    let trait_rule = compile(&rule, &mut specs).unwrap();
    let p = profile(4);
    assert!(trait_rule.root.eval(&p, 0));
    // A windowed per-value event rule over a counter with a few values.
    let event_rule = Rule::parse(
        &json!({"event": "Product Viewed", "count": {"gte": 3}, "within": {"days": 7}, "per": "sku"}),
        "rule",
    )
    .unwrap();
    let event_rule = compile(&event_rule, &mut specs).unwrap();
    let spec = specs.0[0].clone();
    let mut q = profile(5);
    let now = 1_800_000_000_000i64;
    for (k, sku) in ["A", "B", "C", "A", "B", "A"].iter().enumerate() {
        q.counter_mut(0, || spec.empty())
            .record(&spec, now - k as i64 * 3_600_000, Some(sku));
    }
    assert!(event_rule.root.eval(&q, now));

    let mut g = c.benchmark_group("rule_eval");
    g.throughput(Throughput::Elements(1));
    // Baseline: the five trait lookups alone, without comparing.
    let keys: Vec<_> = ["plan", "seats", "country", "tags", "email"]
        .iter()
        .map(|k| user360::domain::value::trait_keys().intern(k))
        .collect();
    g.bench_function("baseline_five_trait_lookups", |b| {
        b.iter(|| {
            black_box(
                keys.iter()
                    .filter(|k| black_box(&p).trait_value(**k).is_some())
                    .count(),
            )
        })
    });
    g.bench_function("five_condition_trait_rule", |b| {
        b.iter(|| black_box(trait_rule.root.eval(black_box(&p), 0)))
    });
    g.bench_function("windowed_per_value_event_rule", |b| {
        b.iter(|| black_box(event_rule.root.eval(black_box(&q), now)))
    });
    g.finish();

    // A backfill pass: evaluate and record membership for 100,000 profiles.
    let mut profiles: Vec<Profile> = (0..100_000).map(profile).collect();
    let mut g = c.benchmark_group("backfill_pass");
    g.throughput(Throughput::Elements(profiles.len() as u64));
    g.sample_size(10);
    g.bench_function("trait_rule_100k_profiles", |b| {
        b.iter(|| {
            let mut n = 0;
            for p in profiles.iter_mut() {
                let holds = trait_rule.root.eval(&*p, 0);
                n += p.set_member(0, holds, 1) as usize;
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, evaluation);
criterion_main!(benches);
