//! Oplog entries and slices. An entry is one operation on one document, stamped with the
//! source's `{t, i}` timestamp, its number in the job's oplog (1, 2, 3, ... with no gap)
//! and the source's checksum right after it, so any point of the oplog can be checked.
//! A slice is a run of entries sent as one message: JSON lines, with headers naming its
//! first and last timestamp and the checksum at the last.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::checksum::Checksum;

/// First timestamp of a slice (`t:i`).
pub const FIRST_TS: &str = "Handoff-First-Ts";
/// Last timestamp of a slice (`t:i`).
pub const LAST_TS: &str = "Handoff-Last-Ts";
/// Number (`n`) of a slice's last entry.
pub const LAST_N: &str = "Handoff-Last-N";
/// Source checksum after a slice's last entry.
pub const CHECKSUM: &str = "Handoff-Checksum";

/// A MongoDB-style oplog timestamp: seconds since the epoch and an increment within it.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub struct Ts {
    pub t: u32,
    pub i: u32,
}

impl Ts {
    pub const ZERO: Ts = Ts { t: 0, i: 0 };
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.t, self.i)
    }
}

impl FromStr for Ts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not an oplog timestamp (seconds:increment, e.g. 1700000000:3)");
        let (t, i) = s.split_once(':').ok_or_else(bad)?;
        Ok(Ts {
            t: t.parse().map_err(|_| bad())?,
            i: i.parse().map_err(|_| bad())?,
        })
    }
}

/// What an entry does to its document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Op {
    /// Insert (or replace) the document.
    #[serde(rename = "i")]
    Insert,
    /// Replace the document with a new version.
    #[serde(rename = "u")]
    Update,
    /// Delete the document.
    #[serde(rename = "d")]
    Delete,
}

/// One oplog entry, borrowed from the slice it was read from.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry<'a> {
    pub ts: Ts,
    pub n: u64,
    pub op: Op,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<&'a RawValue>,
    /// The source's checksum right after this entry.
    pub c: Checksum,
}

/// Why a slice cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("oplog entry {line} of the slice is not valid: {source}")]
    Entry {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("oplog entry {line} of the slice ({op:?} {id}) has no document")]
    NoDocument { line: usize, op: Op, id: String },
}

/// The entries of a slice, in order.
pub fn decode(payload: &[u8]) -> Result<Vec<Entry<'_>>, SliceError> {
    let mut out = Vec::with_capacity(payload.len() / 256 + 1);
    for (line, bytes) in payload
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let entry: Entry<'_> =
            serde_json::from_slice(bytes).map_err(|source| SliceError::Entry {
                line: line + 1,
                source,
            })?;
        if entry.op != Op::Delete && entry.doc.is_none() {
            return Err(SliceError::NoDocument {
                line: line + 1,
                op: entry.op,
                id: entry.id.into_owned(),
            });
        }
        out.push(entry);
    }
    Ok(out)
}

/// Appends an entry as one JSON line.
pub fn encode_into(out: &mut Vec<u8>, entry: &Entry<'_>) {
    serde_json::to_writer(&mut *out, entry).expect("an entry always serializes");
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_lines_are_named() {
        let doc = RawValue::from_string(r#"{"_id":"d1","v":1}"#.into()).unwrap();
        let mut buf = Vec::new();
        let mut c = Checksum::default();
        c.insert("d1", doc.get().as_bytes());
        encode_into(
            &mut buf,
            &Entry {
                ts: Ts { t: 5, i: 1 },
                n: 1,
                op: Op::Insert,
                id: "d1".into(),
                doc: Some(&doc),
                c,
            },
        );
        encode_into(
            &mut buf,
            &Entry {
                ts: Ts { t: 5, i: 2 },
                n: 2,
                op: Op::Delete,
                id: "d1".into(),
                doc: None,
                c: Checksum::default(),
            },
        );
        let entries = decode(&buf).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].doc.unwrap().get(), doc.get());
        assert_eq!(entries[1].ts.to_string(), "5:2");
        assert!(matches!(
            decode(b"{\"ts\":1}\n"),
            Err(SliceError::Entry { line: 1, .. })
        ));
        let no_doc = br#"{"ts":{"t":1,"i":1},"n":1,"op":"u","id":"x","c":"0-0"}"#;
        assert!(matches!(decode(no_doc), Err(SliceError::NoDocument { .. })));
        assert_eq!("7:9".parse::<Ts>().unwrap(), Ts { t: 7, i: 9 });
        assert!("7".parse::<Ts>().is_err());
    }
}
