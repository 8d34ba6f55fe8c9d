//! The checksum of a data set: the number of documents and a sum of one 64-bit hash per
//! document (id and bytes). A sum does not depend on order, so the source, a head and a
//! restore compute the same value however they got there, and it updates in O(1) per
//! operation: add a document's hash on insert, subtract it on delete.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Count and hash sum of a set of documents. Text form `count-hexsum`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Checksum {
    pub count: u64,
    pub sum: u64,
}

/// FNV-1a over the id, a separator and the document, finished with a SplitMix64 mix so
/// that sums of hashes of similar documents spread over all bits.
pub fn doc_hash(id: &str, doc: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(doc.iter().copied())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Checksum {
    pub fn insert(&mut self, id: &str, doc: &[u8]) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(doc_hash(id, doc));
    }

    pub fn remove(&mut self, id: &str, doc: &[u8]) {
        self.count = self.count.saturating_sub(1);
        self.sum = self.sum.wrapping_sub(doc_hash(id, doc));
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:016x}", self.count, self.sum)
    }
}

impl FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a checksum (count-hexsum)");
        let (count, sum) = s.split_once('-').ok_or_else(bad)?;
        Ok(Checksum {
            count: count.parse().map_err(|_| bad())?,
            sum: u64::from_str_radix(sum, 16).map_err(|_| bad())?,
        })
    }
}

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for Checksum {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Checksum".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Number of documents and the sum of their hashes: count-hexsum.",
            "type": "string",
            "pattern": "^[0-9]{1,20}-[0-9a-f]{16}$"
        })
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any order of inserts gives the same checksum, and removing what was inserted
        /// gives back the empty one.
        #[test]
        fn order_free_and_reversible(docs in proptest::collection::btree_map("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..40), 0..30)) {
            let mut forward = Checksum::default();
            for (id, d) in &docs { forward.insert(id, d); }
            let mut backward = Checksum::default();
            for (id, d) in docs.iter().rev() { backward.insert(id, d); }
            prop_assert_eq!(forward, backward);
            prop_assert_eq!(forward.to_string().parse::<Checksum>().unwrap(), forward);
            for (id, d) in &docs { forward.remove(id, d); }
            prop_assert_eq!(forward, Checksum::default());
        }
    }

    #[test]
    fn a_changed_byte_changes_the_checksum() {
        let mut a = Checksum::default();
        a.insert("d1", br#"{"v":1}"#);
        let mut b = Checksum::default();
        b.insert("d1", br#"{"v":2}"#);
        assert_ne!(a, b);
        assert!("12".parse::<Checksum>().is_err());
    }
}
