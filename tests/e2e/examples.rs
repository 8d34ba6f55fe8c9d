//! The example client of schemas/README.md, written in Python from that page alone, run
//! against `handoff up`.

use std::path::PathBuf;
use std::process::Command as Process;

use anyhow::{bail, Context as _, Result};
use handoff_tests::*;
use serde_json::Value;

/// The interpreter with the example's packages: `HANDOFF_PYTHON`, or the one
/// `scripts/install-python` sets up (scripts/test runs it).
fn python() -> Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = match std::env::var_os("HANDOFF_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => root.join(".tools/python/bin/python"),
    };
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/install-python (or set HANDOFF_PYTHON)",
            path.display()
        );
    }
    Ok(path)
}

/// It checks the signing test vector, creates a job, moves it after a dry run, retries
/// the move by id (`duplicate: true`) and reads the job's history, which shows who moved
/// it and why.
#[tokio::test]
async fn the_python_example_client_does_what_the_cli_does() -> Result<()> {
    let python = python()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/client.py");
    let up = Up::start().await?;
    let url = up.url();
    let creds = up.data.path().join("pyclient.creds");
    let creds_arg = creds.to_string_lossy().into_owned();
    handoff_ok(
        &url,
        &[
            "user",
            "add",
            "pyclient",
            "--role",
            "GLOBAL_BACKUP_ADMIN",
            "--out",
            &creds_arg,
        ],
    )?;
    let stderr = up.data.path().join("client.stderr");
    let mut command = Process::new(python);
    command
        .arg(&script)
        .args(["--server", &url, "--creds", &creds_arg])
        .stderr(std::fs::File::create(&stderr)?);
    let run = Background::program("python client".into(), command)?;
    let (code, lines) = run.finish()?;
    let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(code, 0, "stdout: {lines:#?}\nstderr: {errors}");
    let steps: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step in {steps:#?}"))
    };
    assert_eq!(step("test_vector")["ok"], true);
    assert!(step("dry_run")["checks"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c == "head_space")));
    assert_eq!(step("moved")["duplicate"], false);
    assert_eq!(step("retried")["duplicate"], true);
    let done = step("done");
    let history: Vec<&str> = done["history"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        history.first().copied(),
        Some("BackupJobCreated"),
        "{history:?}"
    );
    assert!(history.contains(&"JobMoveStarted"), "{history:?}");

    // What the stack holds agrees: the job is on the destination, and its own events say
    // who moved it and why.
    up.settle().await?;
    let job = done["job"].as_str().expect("a job");
    let jobs = handoff_ok(&url, &["jobs", "--project", "pyexample", "--json"])?.json()?;
    assert_eq!(jobs["total"], 1, "{jobs}");
    assert_eq!(jobs["items"][0]["job"], job);
    assert_eq!(jobs["items"][0]["owner"], done["to"]);
    let started = handoff_ok(&url, &["history", "--job", job, "--json"])?
        .stdout
        .lines()
        .map(serde_json::from_str::<Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|e| e["type"] == "JobMoveStarted")
        .expect("the job's history has its move");
    assert_eq!(started["actor"], "pyclient");
    assert_eq!(started["data"]["reason"], "python example");
    assert_eq!(started["data"]["to"], done["to"]);
    assert_eq!(started["command"], done["move_id"]);
    Ok(())
}
