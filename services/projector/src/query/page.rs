//! Paging: a page's size, its cursors, and a page that stops before the server's payload
//! limit; a reply that cannot fit becomes an error reply.

use super::*;

/// The reply as is if it fits the server's payload limit, else an error reply saying why
/// (a reply over the limit would never arrive: the asker would wait for its timeout).
pub fn fit(body: Vec<u8>, max_payload: usize) -> Vec<u8> {
    if body.len() + FRAME_BYTES / 2 <= max_payload {
        return body;
    }
    let error = too_large(body.len(), max_payload);
    serde_json::to_vec(&json!({ "error": error })).expect("json values serialize")
}

pub(super) fn too_large(size: usize, max_payload: usize) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Validation,
        "reply_too_large",
        format!(
            "the answer is {size} bytes, more than the server's payload limit of {max_payload} \
             allows in one reply"
        ),
    )
}

/// The page size asked for, checked.
pub(super) fn limit(asked: Option<u32>) -> Result<usize, ErrorBody> {
    match asked.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n as usize),
        n => Err(invalid(
            "bad_limit",
            format!("limit {n} is outside 1 to {MAX_LIMIT}"),
        )),
    }
}

/// A cursor is the hexadecimal of the last key's part after the list's prefix.
pub(super) fn encode_cursor(prefix: &[u8], key: &[u8]) -> String {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    rest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key a cursor of the list under `prefix` stands for.
pub(super) fn decode_cursor(
    prefix: &[u8],
    cursor: Option<&str>,
) -> Result<Option<Vec<u8>>, ErrorBody> {
    let Some(c) = cursor else { return Ok(None) };
    let bad = || {
        invalid(
            "bad_cursor",
            format!("cursor {c:?} is not one this list gave out"),
        )
    };
    if c.is_empty() || c.len() % 2 != 0 || c.len() > 2 * MAX_REQUEST_BYTES {
        return Err(bad());
    }
    let mut key = prefix.to_vec();
    for i in (0..c.len()).step_by(2) {
        let byte = c
            .get(i..i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(bad)?;
        key.push(byte);
    }
    Ok(Some(key))
}

/// A list to page through: the keys under `prefix`, from after `cursor`, in key order or
/// its reverse; `item` turns a key and its value into an item, or `None` for one the
/// filters leave out.
pub(super) struct List<'a> {
    pub(super) prefix: Vec<u8>,
    pub(super) reverse: bool,
    pub(super) limit: Option<u32>,
    pub(super) cursor: Option<&'a str>,
}

impl Query<'_> {
    /// One page of `list`: up to its limit of items, fewer if the next would outgrow the
    /// reply's budget.
    pub(super) fn page<T: Serialize>(
        &self,
        list: List<'_>,
        total: u64,
        item: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, ErrorBody>,
    ) -> Result<Value, ErrorBody> {
        let after = decode_cursor(&list.prefix, list.cursor)?;
        let entries = self
            .store
            .range(&list.prefix, after.as_deref(), list.reverse)
            .map(|e| e.map_err(internal));
        self.page_of(&list.prefix, list.limit, total, entries, item)
    }

    /// A page of `entries`, keys under `prefix` (the next page's cursor is the last one's
    /// key), as [`Query::page`].
    pub(super) fn page_of<T: Serialize>(
        &self,
        prefix: &[u8],
        limit: Option<u32>,
        total: u64,
        entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), ErrorBody>>,
        mut item: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, ErrorBody>,
    ) -> Result<Value, ErrorBody> {
        let limit = self::limit(limit)?;
        let mut items = Vec::new();
        let mut used = 0;
        let mut last: Option<Vec<u8>> = None;
        let mut more = false;
        for entry in entries {
            let (k, v) = entry?;
            let Some(found) = item(&k, &v)? else {
                continue;
            };
            let encoded = serde_json::to_value(found).map_err(internal)?;
            let size = serde_json::to_vec(&encoded).map_err(internal)?.len() + 1;
            if items.len() == limit || used + size > self.budget {
                if items.is_empty() {
                    return Err(too_large(size, self.max));
                }
                more = true;
                break;
            }
            used += size;
            items.push(encoded);
            last = Some(k);
        }
        let next = match (more, last) {
            (true, Some(k)) => Some(encode_cursor(prefix, &k)),
            _ => None,
        };
        let mut page = json!({ "items": items, "total": total });
        if let Some(next) = next {
            page["next"] = json!(next);
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply that fits goes as it is; one over the limit becomes an error reply that
    /// says why, itself well within the limit.
    #[test]
    fn a_reply_over_the_payload_limit_becomes_an_error_reply() {
        let small = serde_json::to_vec(&json!({ "ok": { "items": [1, 2], "total": 2 } })).unwrap();
        assert_eq!(fit(small.clone(), 1 << 20), small);
        let big = serde_json::to_vec(&json!({ "ok": "x".repeat(2 << 20) })).unwrap();
        let answer: Value = serde_json::from_slice(&fit(big.clone(), 1 << 20)).unwrap();
        assert_eq!(answer["error"]["reason"], "reply_too_large");
        assert_eq!(answer["error"]["code"], "validation");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&big.len().to_string()) && message.contains("1048576"),
            "{message}"
        );
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let prefix = views::prefix(&["job"]);
        let key = views::job_key(&handoff_domain::JobId::new("p/rs0").unwrap());
        let c = encode_cursor(&prefix, &key);
        assert_eq!(decode_cursor(&prefix, Some(&c)).unwrap(), Some(key));
        for bad in ["", "z", "zz", "abc"] {
            let e = decode_cursor(&prefix, Some(bad)).unwrap_err();
            assert_eq!(e.reason, "bad_cursor", "{bad}");
        }
        assert!(limit(Some(0)).is_err() && limit(Some(MAX_LIMIT + 1)).is_err());
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT as usize);
    }
}
