//! `schemas/dataplane/` agrees with the code: the files are exactly what the types
//! generate, and real oplog entries, snapshot lines and records validate against them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use handoff_dataplane::oplog::Ts;
use handoff_dataplane::source::sim::{Config, Sim};
use handoff_dataplane::store::{HeadRecord, Heartbeat, Lease, Settings, SnapshotMeta};
use handoff_domain::model::MovePhase;
use handoff_domain::{DaemonId, JobId};
use handoff_protocol::dataplane::{Done, Progress};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn assert_valid(path: &str, instance: &Value) {
    let text =
        std::fs::read_to_string(dir().join(path)).unwrap_or_else(|e| panic!("schemas/{path}: {e}"));
    let validator =
        jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{instance} does not match schemas/{path}: {errors:?}"
    );
}

/// The files under `schemas/dataplane/` are exactly the generated schemas.
#[test]
fn schema_files_match_the_code() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut expected = BTreeSet::new();
    for (path, schema) in handoff_protocol::dataplane::schemas::all() {
        let generated = serde_json::to_value(&schema).unwrap();
        let file = dir().join(&path);
        if update {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(
                &file,
                serde_json::to_string_pretty(&generated).unwrap() + "\n",
            )
            .unwrap();
        }
        let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_else(|_| {
            panic!("schemas/{path} is missing: run UPDATE_SCHEMAS=1 cargo test -p handoff-dataplane --test schemas")
        }))
        .unwrap();
        assert_eq!(on_disk, generated, "schemas/{path} is out of date: run UPDATE_SCHEMAS=1 cargo test -p handoff-dataplane --test schemas");
        expected.insert(path);
    }
    let found: BTreeSet<String> = std::fs::read_dir(dir().join("dataplane"))
        .unwrap()
        .map(|e| format!("dataplane/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".json"))
        .collect();
    let stale: Vec<_> = found.difference(&expected).collect();
    assert!(
        stale.is_empty(),
        "schemas with no type behind them: {stale:?}"
    );
}

/// Real values, as the agent, the daemons and restores write them, match their schemas.
#[test]
fn real_values_match_their_schemas() {
    let mut source = Sim::new(&Config {
        seed: 7,
        initial_bytes: 2_000,
        doc_bytes: 100,
        ..Config::default()
    });
    let mut snapshot = Vec::new();
    for (id, doc) in source.documents() {
        handoff_dataplane::snapshot::write_line(&mut snapshot, id, doc.as_bytes());
    }
    for line in snapshot.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        assert_valid(
            "dataplane/snapshot-line.json",
            &serde_json::from_slice(line).unwrap(),
        );
    }
    let mut oplog = Vec::new();
    for k in 0..200 {
        source.step(
            Ts {
                t: 1_700_000_000,
                i: k + 1,
            },
            &mut oplog,
        );
    }
    let mut ops = BTreeSet::new();
    for line in oplog.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        ops.insert(v["op"].as_str().unwrap().to_owned());
        assert_valid("dataplane/oplog-entry.json", &v);
    }
    assert_eq!(
        ops.len(),
        3,
        "inserts, updates and deletes were all checked"
    );
    let job = JobId::new("p/rs").unwrap();
    let daemon = DaemonId::new("d1.example.net:/heads/").unwrap();
    let meta = SnapshotMeta {
        id: "01J00000000000000000000001".into(),
        job: job.clone(),
        epoch: 2,
        ts: Ts {
            t: 1_700_000_000,
            i: 200,
        },
        n: 200,
        oplog_seq: 9,
        checksum: source.checksum(),
        size_bytes: 1234,
        taken_at_ms: 1,
        slot_ms: Some(0),
        daemon: Some(daemon.clone()),
    };
    assert_valid(
        "dataplane/snapshot-meta.json",
        &serde_json::to_value(&meta).unwrap(),
    );
    let head = HeadRecord {
        daemon: daemon.clone(),
        epoch: 2,
        applied_seq: 9,
        n: 200,
        ts: meta.ts,
        checksum: meta.checksum,
        at_ms: 5,
    };
    assert_valid("dataplane/head.json", &serde_json::to_value(&head).unwrap());
    assert_valid(
        "dataplane/lease.json",
        &serde_json::to_value(Lease {
            job: job.clone(),
            from_seq: 3,
            at_ms: 4,
        })
        .unwrap(),
    );
    let hb = Heartbeat {
        daemon: daemon.clone(),
        at_ms: 1,
        started_at_ms: 0,
        pid: 42,
        jobs: 3,
        rebuilding: 1,
    };
    assert_valid(
        "dataplane/heartbeat.json",
        &serde_json::to_value(&hb).unwrap(),
    );
    assert_valid(
        "dataplane/settings.json",
        &serde_json::to_value(Settings::default()).unwrap(),
    );
    assert_valid(
        "dataplane/schedule.json",
        &serde_json::to_value(Settings::default().schedule).unwrap(),
    );
    let p = Progress {
        move_id: "01J00000000000000000000002".into(),
        job,
        daemon,
        epoch: 2,
        phase: MovePhase::ReplayingOplog,
        snapshot_bytes: 10,
        snapshot_total: 10,
        entries_applied: 99,
        lag_ms: 12,
        done: None,
    };
    assert_valid(
        "dataplane/progress.json",
        &serde_json::to_value(&p).unwrap(),
    );
    let ends = [
        Done::Completed {
            ts: Ts {
                t: 1_700_000_000,
                i: 3,
            },
            checksum: Default::default(),
        },
        Done::Failed {
            reason: "no snapshot".into(),
        },
    ];
    for done in ends {
        let last = Progress {
            phase: MovePhase::Completed,
            done: Some(done),
            ..p.clone()
        };
        assert_valid(
            "dataplane/progress.json",
            &serde_json::to_value(&last).unwrap(),
        );
    }
}
