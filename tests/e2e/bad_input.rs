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
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("move-jobs", b"{not json".to_vec(), "malformed"),
        ("move-jobs", b"".to_vec(), "malformed"),
        ("move-jobs", br#"[1,2,3]"#.to_vec(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","actor":"a","command":{{"from":"{d1}","to":7}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","actor":"a","command":{{"from":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","actor":"a","command":{{"from":"{d1}","to":"{d1}","sudo":true}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","actor":"a","command":{{"from":"h:/x/","to":"x.>:/y/"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"not-a-ulid","actor":"a","command":{{"from":"{d1}","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-jobs", format!(r#"{{"id":"{id}","actor":"a\u0000b","command":{{"from":"{d1}","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("move-job", format!(r#"{{"id":"{id}","actor":"a","command":{{"job":"p1/rs0\n","to":"{d1}"}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":-1,"head_space_bytes":1}}}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":99999999999999999999,"head_space_bytes":1}}}}}}"#).into_bytes(), "malformed"),
        ("register-daemon", format!(r#"{{"id":"{id}","actor":"a","command":{{"daemon":"h:/d/","settings":{{"assignment_enabled":true,"backup_jobs_enabled":true,"restore_jobs_enabled":true,"garbage_collection_enabled":true,"head_disk_type":"HDD","num_workers":0,"head_space_bytes":1}}}}}}"#).into_bytes(), "invalid"),
        ("move-jobs", vec![b' '; 70 * 1024], "too_large"),
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
