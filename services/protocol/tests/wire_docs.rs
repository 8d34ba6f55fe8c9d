//! schemas/README.md is the contract a client in another language is written from: every
//! endpoint, query, subject and store the code defines is named there, and its signing
//! and checksum test vectors are what the code computes.

use handoff_domain::alert::{AlertKey, AlertKind};
use handoff_domain::event::Aggregate;
use handoff_domain::{Actor, CommandId, DaemonId, JobId, ProjectId};
use handoff_protocol::api::query::QUERIES;
use handoff_protocol::api::ENDPOINTS;
use handoff_protocol::auth::{verify, Credentials};
use handoff_protocol::dataplane::checksum::{doc_hash, Checksum};
use handoff_protocol::{dataplane, subjects};

fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/README.md");
    std::fs::read_to_string(path).expect("schemas/README.md is readable")
}

/// A table row of the README naming `name` in its first column.
fn has_row(readme: &str, name: &str) -> bool {
    readme
        .lines()
        .any(|l| l.starts_with(&format!("| `{name}` |")))
}

#[test]
fn every_endpoint_and_query_has_a_row() {
    let readme = readme();
    let missing: Vec<&str> = ENDPOINTS
        .iter()
        .map(|e| e.name)
        .chain(QUERIES.iter().copied())
        .filter(|name| !has_row(&readme, name))
        .collect();
    assert!(
        missing.is_empty(),
        "schemas/README.md has no row for {missing:?}"
    );
    // The query schemas are the same list.
    let mut schemas: Vec<String> = handoff_protocol::schemas::all()
        .into_iter()
        .filter_map(|(path, _)| {
            path.strip_prefix("queries/")?
                .strip_suffix(".request.json")
                .map(str::to_owned)
        })
        .collect();
    let mut queries: Vec<String> = QUERIES.iter().map(|q| q.to_string()).collect();
    schemas.sort();
    queries.sort();
    assert_eq!(schemas, queries);
}

/// One aggregate of each kind, named as the README's examples name them, and its index
/// in the list: a new kind fails to compile in [`kind`] until it is given an index, and
/// the test fails until it has a sample (and so a subject the README must name).
fn samples() -> Vec<Aggregate> {
    let id = CommandId::new("01JDQ2Y7Q8M5VZ3K6W8T4N2R9X").unwrap();
    vec![
        Aggregate::Daemon(DaemonId::new("backup1.example.net:/data/backup/").unwrap()),
        Aggregate::Project(ProjectId::new("sales").unwrap()),
        Aggregate::Job(JobId::new("sales/orders").unwrap()),
        Aggregate::Move(id.clone()),
        Aggregate::User(Actor::new("alice").unwrap()),
        Aggregate::Audit("forbidden".into()),
        Aggregate::Alert(AlertKey::new(AlertKind::MoveStuck, "sales/orders")),
        Aggregate::Failover(id.clone()),
        Aggregate::Answer(id),
    ]
}

fn kind(a: &Aggregate) -> usize {
    match a {
        Aggregate::Daemon(_) => 0,
        Aggregate::Project(_) => 1,
        Aggregate::Job(_) => 2,
        Aggregate::Move(_) => 3,
        Aggregate::User(_) => 4,
        Aggregate::Audit(_) => 5,
        Aggregate::Alert(_) => 6,
        Aggregate::Failover(_) => 7,
        Aggregate::Answer(_) => 8,
    }
}

/// The rows of the README's subject table ("## Subjects").
fn subject_rows(readme: &str) -> Vec<&str> {
    let table = readme
        .split_once("## Subjects")
        .expect("schemas/README.md has a Subjects section")
        .1;
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect()
}

#[test]
fn every_subject_and_store_is_named() {
    let readme = readme();
    let rows = subject_rows(&readme);
    let mut missing = Vec::new();
    let samples = samples();
    let kinds: std::collections::BTreeSet<usize> = samples.iter().map(kind).collect();
    assert_eq!(
        kinds,
        (0..9).collect(),
        "one sample of each kind of aggregate"
    );
    for a in &samples {
        // A row of the subject table for the kind (`handoff.evt.<kind>.`) ...
        let subject = subjects::aggregate(a);
        let prefix: Vec<&str> = subject.splitn(4, '.').take(3).collect();
        let row = format!("| `{}.", prefix.join("."));
        if !rows.iter().any(|r| r.starts_with(&row)) {
            missing.push(row);
        }
        // ... and, for the kinds whose ids are encoded or hashed, the sample's subject
        // exactly as the examples write it.
        if matches!(
            a,
            Aggregate::Daemon(_) | Aggregate::Alert(_) | Aggregate::Answer(_)
        ) && !readme.contains(&subject)
        {
            missing.push(subject);
        }
    }
    let others = [
        subjects::command("x"),
        subjects::query("x"),
        subjects::progress("x"),
        subjects::oplog(&JobId::new("p/d").unwrap()),
    ];
    for s in others {
        let named = format!("`{}", &s[..s.rfind('.').unwrap() + 1]);
        if !readme.contains(&named) {
            missing.push(named);
        }
    }
    let names = [
        subjects::STREAM,
        subjects::COMMAND_ARCHIVE_BUCKET,
        subjects::MODEL_BUCKET,
        subjects::MODEL_OBJECT,
        dataplane::OPLOG_STREAM,
        dataplane::SNAPSHOT_BUCKET,
        dataplane::SNAPSHOT_META_KEY,
        dataplane::SNAPSHOT_INDEX_BUILT,
        handoff_protocol::auth::SIGNATURE_HEADER,
        dataplane::oplog::FIRST_TS,
        dataplane::oplog::LAST_TS,
        dataplane::oplog::LAST_N,
        dataplane::oplog::CHECKSUM,
    ];
    for s in names.iter().chain(dataplane::BUCKETS.iter()) {
        if !readme.contains(&format!("`{s}`")) && !readme.contains(&format!("`{s}:")) {
            missing.push(format!("`{s}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "schemas/README.md does not name {missing:?}"
    );
}

/// Every rejection the domain can give (its `type`, as reply.json lists them) is in the
/// README's table of reasons.
#[test]
fn every_rejection_reason_is_in_the_table() {
    let readme = readme();
    let table = readme
        .split_once("| code | reasons |")
        .expect("schemas/README.md has a table of reasons")
        .1;
    let table: String = table
        .lines()
        .take_while(|l| l.starts_with('|') || l.is_empty())
        .collect();
    let reply = handoff_protocol::schemas::all()
        .into_iter()
        .find(|(path, _)| path == "reply.json")
        .expect("reply.json")
        .1;
    let reply = serde_json::to_value(reply).unwrap();
    let reasons: Vec<String> = reply["$defs"]["Rejection"]["oneOf"]
        .as_array()
        .expect("the rejections")
        .iter()
        .filter_map(|v| v["properties"]["type"]["const"].as_str().map(str::to_owned))
        .collect();
    assert!(reasons.len() > 20, "{reasons:?}");
    let missing: Vec<&String> = reasons
        .iter()
        .filter(|r| !table.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "schemas/README.md's table of reasons lacks {missing:?}"
    );
}

/// The value in the row named `name` of the README's signing test vector.
fn vector(readme: &str, name: &str) -> String {
    let table = readme
        .split_once("**Test vector.**")
        .expect("schemas/README.md has a signing test vector")
        .1;
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no test vector row {name:?} in schemas/README.md"));
    let value = row[name.len() + 4..].trim_end_matches('|').trim();
    value.trim_matches('`').to_owned()
}

#[test]
fn the_signing_test_vector_is_what_the_code_signs() {
    let readme = readme();
    let seed = vector(&readme, "seed");
    let creds = Credentials::from_seed(Actor::new("alice").unwrap(), seed, None).unwrap();
    assert_eq!(creds.public_key().as_str(), vector(&readme, "public key"));
    let subject = vector(&readme, "subject");
    let body = vector(&readme, "body");
    let signature = vector(&readme, "`Handoff-Signature`");
    assert_eq!(creds.sign(&subject, body.as_bytes()), signature);
    assert_eq!(
        verify(&creds.public_key(), &subject, body.as_bytes(), &signature),
        Ok(())
    );
    // The body is a valid request of its endpoint.
    let endpoint = subject.strip_prefix("handoff.cmd.").unwrap();
    let parse = ENDPOINTS.iter().find(|e| e.name == endpoint).unwrap().parse;
    let request = parse(body.as_bytes()).expect("the vector's body is a request");
    assert_eq!(request.at, 1_795_702_850_339);
}

#[test]
fn the_checksum_test_vector_is_what_the_code_computes() {
    let readme = readme();
    let (d1, d2) = (r#"{"_id":"d1","v":1}"#, r#"{"_id":"d2","v":2}"#);
    let h1 = format!("{:016x}", doc_hash("d1", d1.as_bytes()));
    let h2 = format!("{:016x}", doc_hash("d2", d2.as_bytes()));
    let mut sum = Checksum::default();
    sum.insert("d1", d1.as_bytes());
    sum.insert("d2", d2.as_bytes());
    let stated = format!(
        "id `d1` with doc `{d1}` hashes\nto `{h1}`, id `d2` with `{d2}` to `{h2}`, and the\ntwo together are `{sum}`."
    );
    assert!(
        readme.contains(&stated),
        "schemas/README.md should state: {stated}"
    );
}

/// Each error code's name, as metrics label it, is its name on the wire.
#[test]
fn error_codes_are_named_as_on_the_wire() {
    use handoff_protocol::ErrorCode::*;
    for code in [
        Validation,
        NotFound,
        Conflict,
        Refused,
        Forbidden,
        Unavailable,
        Internal,
    ] {
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }
}
