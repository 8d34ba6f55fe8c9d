//! The snapshot format: one JSON line per document, `{"id":"..","doc":{..}}`, in id order.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Serialize, Deserialize)]
struct Line<'a> {
    id: &'a str,
    #[serde(borrow)]
    doc: &'a RawValue,
}

pub fn write_line(out: &mut Vec<u8>, id: &str, doc: &[u8]) {
    let doc = std::str::from_utf8(doc).expect("documents are JSON text");
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut *out, id).expect("json");
    out.extend_from_slice(b",\"doc\":");
    out.extend_from_slice(doc.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// The documents of a snapshot, or the line that is not one.
pub fn parse(data: &[u8]) -> Result<Vec<(&str, &[u8])>, String> {
    let mut out = Vec::with_capacity(data.len() / 200 + 1);
    for (k, line) in data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let l: Line<'_> = serde_json::from_slice(line)
            .map_err(|e| format!("line {} is not a document: {e}", k + 1))?;
        out.push((l.id, l.doc.get().as_bytes()));
    }
    Ok(out)
}
