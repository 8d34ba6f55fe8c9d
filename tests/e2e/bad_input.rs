//! Hostile or broken requests get a specific validation error, append nothing and leave
//! the service running.

use anyhow::Result;
use handoff_protocol::ErrorCode;
use handoff_tests::*;

use crate::moves::fleet;

/// Malformed JSON, wrong types, unknown and missing fields, bad ids and oversize bodies
/// are each refused as validation errors; nothing is appended; the service still works.
#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() -> Result<()> {
    let stack = Stack::start().await?;
    fleet(&stack).await?;
    let before = stack.last_seq().await?;
    let id = new_id();
    let d1 = daemon(1).to_string();
    let at = handoff_protocol::auth::now_ms();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("move-jobs", b"{not json".to_vec(), "malformed"),
        ("move-jobs", b"".to_vec(), "malformed"),
        ("move-jobs", br#"[1,2,3]"#.to_vec(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"from":"{d1}","to":7}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"from":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"from":"{d1}","to":"{d1}","sudo":true}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"from":"h:/x/","to":"x.>:/y/"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"not-a-ulid","at":{at},"actor":"a","command":{{"from":"{d1}","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","at":{at},"actor":"a\u0000b","command":{{"from":"{d1}","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-job", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0\n","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":-1,"head_space_bytes":1}}}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":99999999999999999999,"head_space_bytes":1}}}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":0,"head_space_bytes":1}}}}}}"#).into_bytes(), "invalid"),
        ("move-jobs", vec![b' '; 70 * 1024], "too_large"),
        ("resize-oplog-ttl", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0","previous_hours":24,"hours":24,"reason":"x"}}}}"#).into_bytes(), "invalid"),
        ("resize-oplog-ttl", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0","previous_hours":24,"hours":100000,"reason":"x"}}}}"#).into_bytes(), "invalid"),
        ("resize-oplog-ttl", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0","previous_hours":24,"hours":27,"reason":""}}}}"#).into_bytes(), "invalid"),
        ("complete-job-move", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0","move_id":"{id}","epoch":2,"head":{{"ts":"yesterday","checksum":"1-ff"}}}}}}"#).into_bytes(), "invalid"),
        ("complete-job-move", format!(r#"{{"id":"{id}","at":{at},"actor":"a","command":{{"job":"p1/rs0","move_id":"{id}","epoch":2,"head":{{"ts":"1:2","checksum":"1-zz"}}}}}}"#).into_bytes(), "invalid"),
    ];
    let n = cases.len();
    for (endpoint, body, reason) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        let error = stack.send_raw(endpoint, body).await?.expect_err("refused");
        assert_eq!(
            (error.code, error.reason.as_str()),
            (ErrorCode::Validation, reason),
            "{endpoint} {shown}: {}",
            error.message
        );
    }
    assert_eq!(
        stack.last_seq().await?,
        before,
        "a bad request appended events"
    );
    stack.apply(move_jobs(1, 2)).await?;
    println!("{n} bad requests refused");
    Ok(())
}

/// The data plane's commands refuse bad input with a specific error and change nothing:
/// unknown jobs and snapshots, malformed timestamps, schedules Ops Manager would refuse.
#[tokio::test]
async fn bad_restores_and_schedules_are_refused_and_change_nothing() -> Result<()> {
    let stack = Stack::start().await?;
    // The data plane's stores, made as the agent makes them: the CLI only binds to them.
    handoff_dataplane::store::Stores::open(stack.client.clone(), 1).await?;
    let url = stack.url();
    let out = tempfile::tempdir()?;
    let target = out.path().join("r");
    let dir = target.to_str().unwrap_or_default();
    let refused = handoff(
        &url,
        &[
            "restore",
            "--job",
            "p/none",
            "--at",
            "1700000000",
            "--out",
            dir,
        ],
    )?;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("no snapshot of p/none"),
        "{}",
        refused.stderr
    );
    for args in [
        vec![
            "restore",
            "--job",
            "p/rs",
            "--oplog-ts",
            "soon",
            "--out",
            dir,
        ],
        vec![
            "restore",
            "--job",
            "p/rs",
            "--at",
            "yesterday",
            "--out",
            dir,
        ],
        vec!["restore", "--job", "p/rs", "--out", dir],
        vec![
            "restore",
            "--job",
            "p/rs",
            "--at",
            "1",
            "--snapshot",
            "x",
            "--out",
            dir,
        ],
        vec!["schedule", "--interval-hours", "5"],
        vec!["schedule", "--base-days", "9"],
        vec!["schedule", "--reference", "25:00"],
        vec!["schedule", "--oplog-ttl-hours", "0"],
        vec!["daemon", "--id", "no-colon"],
    ] {
        let run = handoff(&url, &args)?;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
    assert!(!target.exists(), "a refused restore wrote files");
    let settings = handoff_ok(&url, &["--json", "schedule"])?.json()?;
    assert_eq!(
        settings["schedule"]["interval_hours"], 6,
        "a refused schedule changed it"
    );
    assert_eq!(settings["retention"]["ttl_hours"], 24);
    // A job's own schedule changes that job only.
    handoff_ok(
        &url,
        &[
            "schedule",
            "--job",
            "p/rs",
            "--interval-hours",
            "12",
            "--reference",
            "02:30",
        ],
    )?;
    let own = handoff_ok(&url, &["--json", "schedule", "--job", "p/rs"])?.json()?;
    assert_eq!(
        (
            own["schedule"]["interval_hours"].as_u64(),
            own["schedule"]["reference_minute"].as_u64()
        ),
        (Some(12), Some(150))
    );
    let default = handoff_ok(&url, &["--json", "schedule"])?.json()?;
    assert_eq!(default["schedule"]["interval_hours"], 6);
    Ok(())
}
