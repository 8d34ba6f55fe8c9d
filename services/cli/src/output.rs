//! Human-readable output: aligned tables, byte sizes, times.

use std::fmt::Write as _;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A table printed with aligned columns.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// The wire name of an enum value (`restoring_snapshot`, `in_progress`, `HDD`).
pub fn name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// `10737418240` → `10.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses `500`, `10GiB`, `10G`, `1.5TB`, `200 MiB` into bytes (powers of 1024 for
/// `KiB`..`PiB` and for a bare `K`..`P`, powers of 1000 for `KB`..`PB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (try 100GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024f64,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "p" | "pib" => 1024f64.powi(5),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "pb" => 1e15,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let v = num * mult;
    if !(0.0..=(handoff_domain::model::MAX_BYTES as f64)).contains(&v) {
        return Err(format!("size out of range: {s:?}"));
    }
    Ok(v as u64)
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn time(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Parses `--since`: RFC 3339 (`2026-11-26T10:00:00Z`) or an age (`90s`, `15m`, `2h`,
/// `7d`) before `now_ms`. Returns milliseconds since the epoch.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64);
    }
    let age = parse_duration(s)
        .map_err(|_| format!("not a time: {s:?} (try 2h, 30m or 2026-11-26T10:00:00Z)"))?;
    Ok(now_ms.saturating_sub(age.as_millis() as u64))
}

/// Parses a duration: a whole number with a unit, `500ms`, `90s`, `15m`, `2h` or `7d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 500ms, 90s, 15m or 2h)"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("not a duration: {s:?} (try 500ms, 90s, 15m or 2h)")),
    };
    n.checked_mul(ms)
        .filter(|ms| *ms <= 365 * 86_400_000)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("duration out of range: {s:?} (at most a year)"))
}

/// How long ago, for people: `800ms`, `12s`, `5m`, `3h`.
pub fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=119_999 => format!("{}s", ms / 1000),
        120_000..=7_199_999 => format!("{}m", ms / 60_000),
        _ => format!("{}h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("10 G"), Ok(10 << 30));
        assert_eq!(parse_bytes("1.5KB"), Ok(1500));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert!(parse_bytes("ten").is_err());
        assert!(parse_bytes("1QB").is_err());
        assert!(parse_bytes("99999999PiB").is_err());
        assert_eq!(bytes(10 << 30), "10.0 GiB");
        assert_eq!(bytes(12), "12 B");
    }

    #[test]
    fn since_takes_ages_and_times() {
        assert_eq!(parse_since("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert!(parse_since("yesterday", 0).is_err());
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("15m"),
            Ok(std::time::Duration::from_secs(900))
        );
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("99999999999999d").is_err());
        assert_eq!(age(12_500), "12s");
        assert_eq!(time(1000), "1970-01-01T00:00:01Z");
    }
}
