//! Earlier layouts of the types whose encoding changed, decoded only to convert them into
//! the current ones (see [`super::codec`]).

/// Format version 1 (before segments).
pub mod v1 {
    use bincode::Decode;

    use crate::domain::value::Value;
    use crate::store::log::{DeleteRecord, EventRecord, MergedAwayRecord, PatchRecord};
    use crate::store::snapshot::EventRefSnap;

    /// A profile, as version 1 stored it.
    #[derive(Debug, Decode)]
    pub struct ProfileSnap {
        id: u128,
        created_at: i64,
        updated_at: i64,
        first_seen: i64,
        last_seen: i64,
        identities: Vec<(String, String, i64)>,
        traits: Vec<(String, Option<Value>, i64)>,
        events: Vec<EventRefSnap>,
        merged_from: Vec<u128>,
        merge_notes: Vec<String>,
    }

    /// A snapshot chunk, as version 1 stored it.
    #[derive(Debug, Decode)]
    pub struct ShardChunk {
        names: Vec<String>,
        profiles: Vec<ProfileSnap>,
        system_log: Vec<(u128, EventRefSnap)>,
    }

    /// A merge's survivor-side record, as version 1 stored it.
    #[derive(Debug, Decode)]
    pub struct AbsorbedRecord {
        seq: u64,
        profile: u128,
        now_ms: i64,
        state: ShardChunk,
    }

    /// A log record, as version 1 stored it.
    #[derive(Debug, Decode)]
    pub enum LogRecord {
        /// Unchanged.
        Event(EventRecord),
        /// Unchanged.
        Patch(PatchRecord),
        /// Unchanged.
        Delete(DeleteRecord),
        /// Unchanged.
        MergedAway(MergedAwayRecord),
        /// Holds a version-1 chunk.
        Absorbed(AbsorbedRecord),
    }

    impl From<ProfileSnap> for crate::store::snapshot::ProfileSnap {
        fn from(p: ProfileSnap) -> Self {
            crate::store::snapshot::ProfileSnap {
                id: p.id,
                created_at: p.created_at,
                updated_at: p.updated_at,
                first_seen: p.first_seen,
                last_seen: p.last_seen,
                identities: p.identities,
                traits: p.traits,
                events: p.events,
                merged_from: p.merged_from,
                merge_notes: p.merge_notes,
                memberships: Vec::new(),
                counters: Vec::new(),
            }
        }
    }

    impl From<ShardChunk> for crate::store::snapshot::ShardChunk {
        fn from(c: ShardChunk) -> Self {
            crate::store::snapshot::ShardChunk {
                names: c.names,
                profiles: c.profiles.into_iter().map(Into::into).collect(),
                system_log: c.system_log,
                specs_json: "[]".into(),
                mappings_json: "[]".into(),
                outbox: Vec::new(),
                erased: Vec::new(),
            }
        }
    }

    impl From<LogRecord> for crate::store::log::LogRecord {
        fn from(r: LogRecord) -> Self {
            use crate::store::log::{AbsorbedRecord as A, LogRecord as L};
            match r {
                LogRecord::Event(e) => L::Event(e),
                LogRecord::Patch(p) => L::Patch(p),
                LogRecord::Delete(d) => L::Delete(d),
                LogRecord::MergedAway(m) => L::MergedAway(m),
                LogRecord::Absorbed(a) => L::Absorbed(A {
                    seq: a.seq,
                    profile: a.profile,
                    now_ms: a.now_ms,
                    state: a.state.into(),
                }),
            }
        }
    }
}
