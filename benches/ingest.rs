//! Ingest hot-path benchmarks. Each group measures User360's code beside a baseline in the
//! same run (raw `serde_json` parsing), so figures can be quoted as ratios.
//!
//! `cargo bench --bench ingest`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;
use std::sync::Arc;

use user360::config::Settings;
use user360::domain::identity::{IdType, Identity, IdentityRules};
use user360::grid::registry::Registry;
use user360::ingest::parse::{Endpoint, ParseContext, ParseNotes, parse_body};
use user360::ingest::scan;
use user360::store::codec;
use user360::store::log::{EventRecord, LogRecord};

fn batch_body(n: usize) -> Vec<u8> {
    let batch: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            json!({"type": "track", "userId": format!("user-{i}"), "anonymousId": format!("anon-{i}"),
                   "event": "Product Viewed", "messageId": format!("m-{i}"),
                   "properties": {"product_id": "P-1", "price": 19.99, "quantity": 2, "tags": ["a", "b"], "name": "A product with a name"},
                   "context": {"library": {"name": "analytics-node", "version": "3.0.13"}, "ip": "203.0.113.7",
                               "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"},
                   "timestamp": "2026-12-03T10:15:00.123Z", "sentAt": "2026-12-03T10:15:01.000Z"})
        })
        .collect();
    serde_json::to_vec(&json!({"batch": batch, "sentAt": "2026-12-03T10:15:01.000Z"})).unwrap()
}

fn parsing(c: &mut Criterion) {
    let body = batch_body(500);
    let settings = Settings::defaults();
    let rules = IdentityRules::new(&settings.identity);
    let mut g = c.benchmark_group("parse_batch_500");
    g.throughput(Throughput::Elements(500));
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    g.bench_function("scan_check_value", |b| {
        b.iter(|| scan::check_value(black_box(&body), 10_000).unwrap())
    });
    g.bench_function("user360_parse_body", |b| {
        b.iter(|| {
            let ctx = ParseContext {
                limits: &settings.ingest,
                rules: &rules,
                received_ms: 1_800_000_000_000,
            };
            black_box(
                parse_body(
                    Endpoint::Batch,
                    black_box(&body),
                    &ctx,
                    &mut ParseNotes::default(),
                )
                .unwrap(),
            )
        })
    });
    g.finish();
}

fn codec_and_registry(c: &mut Criterion) {
    let rec = LogRecord::Event(EventRecord {
        seq: 42,
        profile: 7,
        ts_ms: 1_800_000_000_000,
        received_ms: 1_800_000_000_000,
        kind: user360::domain::event::EventKind::Track,
        name: "Product Viewed".into(),
        created: false,
        dedup_hash: 42,
        note: None,
        linked: vec![],
        json: String::from_utf8(batch_body(1)).unwrap(),
    });
    let mut g = c.benchmark_group("codec_event_record");
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            out.clear();
            codec::encode_into(black_box(&rec), &mut out).unwrap();
        })
    });
    let mut bytes = Vec::new();
    codec::encode_into(&rec, &mut bytes).unwrap();
    g.bench_function("decode", |b| {
        b.iter(|| black_box(codec::decode::<LogRecord>(black_box(&bytes)).unwrap()))
    });
    g.finish();

    let registry = Registry::new(
        2,
        Arc::new(IdentityRules::new(&Settings::defaults().identity)),
    );
    let ids: Vec<Identity> = (0..100_000)
        .map(|i| Identity {
            ty: IdType::USER_ID,
            value: format!("user-{i}").into_boxed_str(),
        })
        .collect();
    for id in &ids {
        registry.resolve(std::slice::from_ref(id), 1).unwrap();
    }
    let mut g = c.benchmark_group("registry");
    let mut i = 0;
    g.bench_function("resolve_known_user", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            black_box(registry.resolve(std::slice::from_ref(&ids[i]), 2).unwrap())
        })
    });
    g.finish();
}

fn rules_apply_and_wal(c: &mut Criterion) {
    use user360::domain::ids::ProfileId;
    use user360::domain::profile::{Profile, TraitLimits, TraitTime};
    use user360::segment::cond::parse_conditions;
    use user360::store::log::ShardLog;

    // Rule evaluation: three property conditions over a typical event's properties.
    let conds = parse_conditions(
        &json!([
            {"property": "price", "op": "gte", "value": 10},
            {"property": "currency", "op": "in", "value": ["USD", "EUR"]},
            {"property": "tags", "op": "contains", "value": "b"}
        ]),
        "where",
    )
    .unwrap();
    let props = json!({"price": 19.99, "currency": "USD", "tags": ["a", "b"], "sku": "S-1"});
    let mut g = c.benchmark_group("rules");
    g.bench_function("three_property_conditions", |b| {
        b.iter(|| black_box(conds.iter().all(|c| c.matches(Some(black_box(&props)), 0))))
    });
    g.finish();

    // Shard apply, domain part: plan + commit five traits and index one event.
    let limits = TraitLimits {
        max_keys: 1000,
        max_bytes: 256 * 1024,
        same_time_ms: 1000,
    };
    let traits: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
        json!({"plan": "pro", "seats": 5, "country": "IN", "name": "Ana", "email": "ana@example.com"}),
    )
    .unwrap();
    let mut g = c.benchmark_group("shard_apply");
    let mut t = 0i64;
    let mut p = Profile::new(ProfileId::new(1, 0, 1), 1);
    g.bench_function("identify_five_traits", |b| {
        b.iter(|| {
            t += 1;
            let plan = p.plan_traits(&traits, TraitTime::Event(t), limits).unwrap();
            black_box(p.commit_traits(plan, t))
        })
    });
    g.finish();

    // WAL: append records and flush (write + fsync) by batch size.
    let rec = LogRecord::Event(EventRecord {
        seq: 1,
        profile: 7,
        ts_ms: 1,
        received_ms: 1,
        kind: user360::domain::event::EventKind::Track,
        name: "Product Viewed".into(),
        created: false,
        dedup_hash: 1,
        note: None,
        linked: vec![],
        json: "x".repeat(600),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut log = ShardLog::open(dir.path(), 0, 1 << 30, 0, |_, _| {}).unwrap();
    let mut g = c.benchmark_group("wal_append_flush");
    for batch in [1usize, 10, 100, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("batch_{batch}_fsync"), |b| {
            b.iter(|| {
                for _ in 0..batch {
                    log.append(&rec).unwrap();
                }
                log.flush(true).unwrap();
            })
        });
    }
    g.finish();
}

fn merges(c: &mut Criterion) {
    use user360::domain::event::{EventKind, EventRef};
    use user360::domain::ids::ProfileId;
    use user360::domain::profile::{Profile, TraitLimits, TraitTime};

    let limits = TraitLimits {
        max_keys: 1000,
        max_bytes: 256 * 1024,
        same_time_ms: 1000,
    };
    let build = |id: u64, offset: i64| {
        let mut p = Profile::new(ProfileId::new(1_800_000_000_000 + offset, 0, id), 1);
        for i in 0..1000i64 {
            p.add_event(EventRef::new(
                1_800_000_000_000 + i * 2 + offset,
                (i * 2 + offset) as u64,
                i as u64,
                1,
                0,
                EventKind::Track,
            ));
        }
        let traits: serde_json::Map<String, serde_json::Value> = serde_json::from_value(
            json!({"plan": "pro", "seats": offset, "country": "IN", "name": "Ana"}),
        )
        .unwrap();
        let plan = p
            .plan_traits(&traits, TraitTime::Event(offset), limits)
            .unwrap();
        p.commit_traits(plan, 1);
        p
    };
    let a = build(1, 0);
    let b = build(2, 1);
    let mut g = c.benchmark_group("merge");
    g.bench_function("absorb_two_profiles_of_1000_events", |bench| {
        bench.iter_batched(
            || (a.clone(), b.clone()),
            |(mut a, b)| {
                a.absorb(b, 2, &|_| None);
                black_box(a)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    parsing,
    codec_and_registry,
    rules_apply_and_wal,
    merges
);
criterion_main!(benches);
