//! Prometheus metrics: `handoff up --metrics ADDR` serves its services' metrics and each
//! daemon process its own on the ports after it, in the text exposition format; a move
//! with a real rebuild, a refused command and the data plane's grooming show up in them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use handoff_tests::*;

const D3: &str = "backup3.example.net:/data/backup/";

/// One sample: its name, its labels and its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (version 0.0.4): `# HELP` and `# TYPE` lines, and
/// samples `name{label="value",...} number`. Anything else is an error.
fn parse(text: &str) -> Result<(Vec<Sample>, BTreeMap<String, String>)> {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| anyhow!("bad TYPE: {line}"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                bail!("unknown type in {line}");
            }
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        if line.starts_with('#') {
            bail!("unknown comment: {line}");
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("no value: {line}"))?;
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(|| format!("bad value in {line}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| anyhow!("unclosed labels: {line}"))?;
                let mut labels = BTreeMap::new();
                // Values here hold no `",` sequence (ids, reasons, kinds).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .ok_or_else(|| anyhow!("bad label {pair:?} in {line}"))?;
                    if !name_ok(k) {
                        bail!("bad label name {k:?} in {line}");
                    }
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name, labels)
            }
        };
        if !name_ok(name) {
            bail!("bad metric name {name:?}");
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Every sample belongs to a declared family (a histogram's by its suffixes).
    for s in &samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.name.strip_suffix(suffix))
            .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(&s.name);
        if !types.contains_key(family) {
            bail!("{} has no TYPE line", s.name);
        }
    }
    Ok((samples, types))
}

/// GET http://addr/metrics, over a plain socket.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response: {response}"))?;
    if !head.starts_with("HTTP/1.1 200")
        || !head
            .to_ascii_lowercase()
            .contains("content-type: text/plain")
    {
        bail!("unexpected response head: {head}");
    }
    // A chunked body: the sizes are on lines of their own.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest
                .split_once("\r\n")
                .ok_or_else(|| anyhow!("bad chunk"))?;
            let size = usize::from_str_radix(size.trim(), 16)?;
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

/// A port with the three after it free, for `up` and its daemons.
fn free_ports() -> Result<u16> {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        if port > 65_000 {
            continue;
        }
        let rest: Vec<_> = (1..=3)
            .map(|n| TcpListener::bind(("127.0.0.1", port + n)))
            .collect();
        if rest.iter().all(|r| r.is_ok()) {
            return Ok(port);
        }
    }
    bail!("no four free ports in a row")
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

#[tokio::test]
async fn every_process_of_up_serves_its_metrics() -> Result<()> {
    let port = free_ports()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let up = Up::start_with(&["--hour-ms", "600", "--metrics", &addr.to_string()]).await?;
    let url = up.url();
    // A move with a real rebuild on daemon 3, and a refused command.
    until(
        "a snapshot of sales/orders to rebuild from",
        TIMEOUT,
        || async {
            let out = handoff_ok(&url, &["snapshots", "--job", "sales/orders", "--json"])?.stdout;
            Ok(out.contains("\"daemon\"").then_some(()))
        },
    )
    .await?;
    handoff_ok(&url, &["move-job", "sales/orders", "--to", D3, "--wait"])?;
    handoff_refused(
        &url,
        &[
            "move-job",
            "sales/orders",
            "--to",
            "nosuch.example.net:/data/",
        ],
        "not_found",
    )?;
    // The services of `up`: the command service, the projector, the monitor, the agent.
    let daemons: BTreeSet<String> = (1..=3)
        .map(|n| format!("backup{n}.example.net:/data/backup/"))
        .collect();
    let (samples, types) = until("the services' metrics", Duration::from_secs(60), || async {
        let (samples, types) = parse(&scrape(addr)?)?;
        let has = |name: &str, labels: &[(&str, &str)]| !find(&samples, name, labels).is_empty();
        let ready = has(
            "handoff_command_duration_seconds_count",
            &[("endpoint", "move-job"), ("outcome", "applied")],
        ) && has("handoff_command_refusals_total", &[("reason", "not_found")])
            && has("handoff_projector_events_applied_total", &[])
            && has("handoff_snapshot_age_seconds", &[("job", "sales/orders")])
            && has("handoff_oplog_window_seconds", &[("job", "sales/orders")])
            && daemons
                .iter()
                .all(|d| has("handoff_heartbeat_age_seconds", &[("daemon", d)]));
        Ok(ready.then_some((samples, types)))
    })
    .await?;
    for (name, kind) in [
        ("handoff_command_duration_seconds", "histogram"),
        ("handoff_command_events_appended_total", "counter"),
        ("handoff_command_refusals_total", "counter"),
        ("handoff_projector_lag_events", "gauge"),
        ("handoff_projector_applied_sequence", "gauge"),
        ("handoff_projector_events_applied_total", "counter"),
        ("handoff_moves_in_progress", "gauge"),
        ("handoff_jobs_moving", "gauge"),
        ("handoff_alerts_open", "gauge"),
        ("handoff_drains_in_progress", "gauge"),
        ("handoff_heartbeat_age_seconds", "gauge"),
        ("handoff_daemons", "gauge"),
        ("handoff_snapshot_age_seconds", "gauge"),
        ("handoff_snapshot_age_max_seconds", "gauge"),
        ("handoff_oplog_window_seconds", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let one = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let found = find(&samples, name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    };
    assert!(one("handoff_command_events_appended_total", &[]) > 0.0);
    assert_eq!(one("handoff_daemons", &[("status", "up")]), 3.0);
    assert_eq!(one("handoff_alerts_open", &[("kind", "DAEMON_DOWN")]), 0.0);
    assert!(one("handoff_projector_applied_sequence", &[]) > 0.0);
    let age = one("handoff_snapshot_age_max_seconds", &[]);
    assert!(age >= one("handoff_snapshot_age_seconds", &[("job", "sales/orders")]));
    for d in &daemons {
        let heard = one("handoff_heartbeat_age_seconds", &[("daemon", d)]);
        assert!((0.0..30.0).contains(&heard), "{d}: {heard}");
    }

    // Daemon 3, its own process, rebuilt the head.
    let d3: SocketAddr = format!("127.0.0.1:{}", port + 3).parse()?;
    let (samples, types) = parse(&scrape(d3)?)?;
    assert_eq!(
        types
            .get("handoff_rebuild_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    let completed = find(
        &samples,
        "handoff_rebuild_duration_seconds_count",
        &[("outcome", "completed")],
    );
    assert!(
        completed.first().is_some_and(|s| s.value >= 1.0),
        "{completed:?}"
    );
    let restored = find(&samples, "handoff_rebuild_bytes_total", &[]);
    assert!(
        restored.first().is_some_and(|s| s.value > 0.0),
        "{restored:?}"
    );
    assert!(!find(&samples, "handoff_rebuilds_in_progress", &[]).is_empty());
    // Daemons 1 and 2 serve theirs too.
    for n in [1, 2] {
        let addr: SocketAddr = format!("127.0.0.1:{}", port + n).parse()?;
        parse(&scrape(addr)?)?;
    }
    // A command that runs and ends has nothing to serve.
    let run = handoff(&url, &["daemons", "--metrics", "127.0.0.1:0"])?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("--metrics is for the long-running processes"),
        "{}",
        run.stderr
    );
    Ok(())
}

/// The parser refuses what is not the exposition format, so the test above can fail.
#[test]
fn the_parser_refuses_malformed_expositions() {
    assert!(parse("# TYPE a counter\na 1\n").is_ok());
    assert!(parse("a 1\n").is_err(), "no TYPE");
    assert!(parse("# TYPE a counter\na one\n").is_err());
    assert!(parse("# TYPE a counter\na{b=\"c\" 1\n").is_err());
    assert!(parse("# TYPE 1a counter\n1a 1\n").is_err());
    assert!(parse("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n").is_ok());
}
