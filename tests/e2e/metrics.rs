//! Prometheus metrics: `handoff up --metrics ADDR` serves its services' metrics and each
//! daemon process its own on the ports after it, in the text exposition format; a move
//! with a real rebuild, a refused command and the data plane's grooming show up in them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use handoff_tests::*;

const D3: &str = "backup3.example.net:/data/backup/";

/// A histogram's series: its family and labels (less `le`).
type Series = (String, BTreeMap<String, String>);

/// One sample: its name, its labels and its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (version 0.0.4): `# HELP` and `# TYPE` lines, and
/// samples `name{label="value",...} number`, each family's samples together and typed
/// once; a histogram's buckets carry `le`, grow with it, and end at `+Inf` with the
/// count; a counter is never negative. Anything else is an error.
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
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                bail!("{name} typed twice");
            }
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        if line.starts_with('#') {
            bail!("unknown comment: {line}");
        }
        let (name, labels, rest) = match line.find(['{', ' ']) {
            Some(i) if line.as_bytes()[i] == b'{' => {
                let (labels, rest) =
                    labels(&line[i + 1..]).with_context(|| format!("bad labels in {line}"))?;
                (&line[..i], labels, rest)
            }
            Some(i) => (&line[..i], BTreeMap::new(), &line[i..]),
            None => bail!("no value: {line}"),
        };
        let value: f64 = match rest.trim() {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(|| format!("bad value in {line}"))?,
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
    let family_of = |s: &Sample| -> String {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.name.strip_suffix(suffix))
            .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(&s.name)
            .to_owned()
    };
    let mut seen: Vec<String> = Vec::new();
    for s in &samples {
        let family = family_of(s);
        let Some(kind) = types.get(&family) else {
            bail!("{} has no TYPE line", s.name);
        };
        if seen.last() != Some(&family) {
            if seen.contains(&family) {
                bail!("{family}'s samples are not together");
            }
            seen.push(family.clone());
        }
        if kind == "counter" && (s.value.is_nan() || s.value < 0.0) {
            bail!("counter {} is {}", s.name, s.value);
        }
    }
    // Each histogram series: buckets by `le`, cumulative, `+Inf` equal to `_count`.
    let mut series: BTreeMap<Series, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for s in &samples {
        let family = family_of(s);
        if types.get(&family).map(String::as_str) != Some("histogram") {
            continue;
        }
        let mut labels = s.labels.clone();
        if s.name.ends_with("_bucket") {
            let le = labels
                .remove("le")
                .ok_or_else(|| anyhow!("{} without le", s.name))?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            series
                .entry((family, labels))
                .or_default()
                .push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert((family, labels), s.value);
        }
    }
    for (key, buckets) in &series {
        if !buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            bail!("{key:?}: buckets not cumulative: {buckets:?}");
        }
        let last = buckets.last().filter(|b| b.0.is_infinite());
        if last.map(|b| b.1) != counts.get(key).copied() {
            bail!("{key:?}: the +Inf bucket is not the count");
        }
    }
    Ok((samples, types))
}

/// `a="x",b="y"} rest` → the labels and what follows the brace.
fn labels(text: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((out, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or_else(|| anyhow!("no value"))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("bad label name {name:?}");
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => bail!("bad escape"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unclosed value"),
            }
        };
        out.insert(name.to_owned(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// GET http://addr/metrics: a 200 in the text format.
fn scrape(addr: SocketAddr) -> Result<String> {
    let r = http_get(addr, "/metrics")?;
    if r.status != 200 || !r.head.contains("content-type: text/plain") {
        bail!("unexpected response: {} {}", r.status, r.head);
    }
    Ok(r.body)
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
        ) && has(
            "handoff_command_errors_total",
            &[("code", "not_found"), ("reason", "not_found")],
        ) && has("handoff_projector_events_applied_total", &[])
            && has("handoff_snapshot_age_seconds", &[("job", "sales/orders")])
            // Set after a daemon's groom round, which comes on a timer of its own.
            && has("handoff_snapshot_age_max_seconds", &[])
            && has("handoff_snapshot_missing_jobs", &[])
            && has("handoff_oplog_window_seconds", &[("job", "sales/orders")])
            // The state's gauges follow the fold within a second or so.
            && find(&samples, "handoff_moves_in_progress", &[])
                .first()
                .is_some_and(|s| s.value == 0.0)
            && daemons
                .iter()
                .all(|d| has("handoff_heartbeat_age_seconds", &[("daemon", d)]));
        Ok(ready.then_some((samples, types)))
    })
    .await?;
    for (name, kind) in [
        ("handoff_command_duration_seconds", "histogram"),
        ("handoff_command_events_appended_total", "counter"),
        ("handoff_command_errors_total", "counter"),
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
        ("handoff_snapshot_missing_jobs", "gauge"),
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
    assert_eq!(
        one("handoff_moves_in_progress", &[]),
        0.0,
        "the move is over"
    );
    assert_eq!(one("handoff_jobs_moving", &[]), 0.0);
    assert_eq!(one("handoff_snapshot_missing_jobs", &[]), 0.0);
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
    assert!(
        parse("# TYPE a counter\na{b=\"c} 1\n").is_err(),
        "unclosed quote"
    );
    assert!(
        parse("# TYPE a counter\n# TYPE a gauge\na 1\n").is_err(),
        "typed twice"
    );
    assert!(
        parse("# TYPE a counter\na -1\n").is_err(),
        "negative counter"
    );
    assert!(
        parse("# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 2\n").is_err(),
        "interleaved"
    );
    let h = |body: &str| parse(&format!("# TYPE h histogram\n{body}"));
    assert!(h("h_bucket 1\nh_count 1\n").is_err(), "no le");
    assert!(
        h("h_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n").is_err(),
        "not cumulative"
    );
    assert!(
        h("h_bucket{le=\"+Inf\"} 2\nh_count 1\n").is_err(),
        "+Inf is not the count"
    );
    assert_eq!(
        parse("# TYPE a gauge\na{d=\"x\\\"y\",e=\"z\"} 1\n")
            .unwrap()
            .0[0]
            .labels["d"],
        "x\"y"
    );
}
