//! Identifiers, each validated when it is built or deserialized, so that nothing past the
//! wire boundary ever holds an id that is empty, oversize, or unsafe in a NATS subject.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A field that does not have the form it must have. Fix the request; never retry as is.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A token of a project, deployment, shard or label: letters, digits, `-` and `_`.
fn check_token(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(Invalid::new(
            field,
            format!("may hold only letters, digits, '-' and '_' (found {c:?})"),
        ));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $pattern:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, Invalid> {
                let value = value.into();
                let check: fn(&str) -> Result<(), Invalid> = $check;
                check(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Invalid;
            fn try_from(value: String) -> Result<Self, Invalid> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        #[cfg(feature = "schema")]
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "pattern": $pattern })
            }
        }
    };
}

string_id!(
    /// A backup daemon, named as Ops Manager names it: the machine and the head root
    /// directory, `host:/data/backup/` (the directory starts and ends with a slash).
    DaemonId,
    "^[A-Za-z0-9._-]+:/([A-Za-z0-9/._-]*/)?$",
    |v| {
        const FIELD: &str = "daemon";
        if v.len() > 255 {
            return Err(Invalid::new(FIELD, "must be at most 255 characters"));
        }
        let Some((machine, dir)) = v.split_once(':') else {
            return Err(Invalid::new(
                FIELD,
                "must be machine:/head/root/dir/ (no ':' found)",
            ));
        };
        if machine.is_empty()
            || !machine
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(Invalid::new(
                FIELD,
                "machine must be a host name (letters, digits, '-', '_' and '.')",
            ));
        }
        if !dir.starts_with('/') || !dir.ends_with('/') {
            return Err(Invalid::new(
                FIELD,
                "head root directory must start and end with '/'",
            ));
        }
        if let Some(c) = dir
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.')))
        {
            return Err(Invalid::new(
                FIELD,
                format!("head root directory holds a character that is not allowed: {c:?}"),
            ));
        }
        if dir.split('/').any(|part| part == "..") {
            return Err(Invalid::new(FIELD, "head root directory must not contain '..'"));
        }
        Ok(())
    }
);

string_id!(
    /// A project (Ops Manager's group): owns deployments and may filter daemons.
    ProjectId,
    "^[A-Za-z0-9_-]{1,64}$",
    |v| check_token("project", v, 64)
);

string_id!(
    /// A label on a daemon, matched against a project's label filter.
    Label,
    "^[A-Za-z0-9_-]{1,64}$",
    |v| check_token("label", v, 64)
);

string_id!(
    /// A replica set, a sharded cluster, or a shard of one.
    DeploymentName,
    "^[A-Za-z0-9_-]{1,64}$",
    |v| check_token("deployment", v, 64)
);

string_id!(
    /// A backup job: `project/replica-set`, `project/cluster/shard` or
    /// `project/cluster/config` for a sharded cluster's config servers.
    JobId,
    "^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){1,2}$",
    |v| {
        let parts: Vec<&str> = v.split('/').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(Invalid::new(
                "job",
                "must be project/deployment or project/cluster/shard",
            ));
        }
        parts.iter().try_for_each(|p| check_token("job", p, 64))
    }
);

string_id!(
    /// A command's id, a ULID chosen by the client: retrying with the same id is safe.
    /// A move's id is the id of the command that started it.
    CommandId,
    "^[0-7][0-9A-HJKMNP-TV-Z]{25}$",
    check_ulid
);

impl CommandId {
    /// The time the id was made, as its ULID says (milliseconds since the Unix epoch):
    /// the first ten characters. A client chooses its ids, so this is the client's word.
    pub fn timestamp_ms(&self) -> u64 {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        self.0.as_bytes()[..10].iter().fold(0, |ms, c| {
            let digit = ALPHABET.iter().position(|a| a == c).unwrap_or(0);
            ms << 5 | digit as u64
        })
    }
}

/// Crockford base32, 26 characters, first character at most '7' (128 bits).
fn check_ulid(v: &str) -> Result<(), Invalid> {
    const ALPHABET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    if v.len() != 26 || !v.chars().all(|c| ALPHABET.contains(c)) || v.as_bytes()[0] > b'7' {
        return Err(Invalid::new(
            "id",
            "must be a ULID (26 characters of Crockford base32, upper case)",
        ));
    }
    Ok(())
}

string_id!(
    /// A user's public key: an nkeys user key (ed25519), `U` and 55 characters of base32.
    /// Only the public half is ever sent; the seed stays in the user's credentials file.
    UserKey,
    "^U[A-Z2-7]{55}$",
    |v| {
        if v.len() != 56 || !v.starts_with('U') || !v.chars().all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)) {
            return Err(Invalid::new(
                "key",
                "must be an nkeys user public key ('U' and 55 characters of base32)",
            ));
        }
        Ok(())
    }
);

/// A move is named by the command that started it.
pub type MoveId = CommandId;

string_id!(
    /// Who asked for a command: a user, whose signature the command service verified;
    /// written on every event.
    Actor,
    "^[A-Za-z0-9._@-]{1,128}$",
    |v| {
        if v.is_empty() || v.len() > 128 {
            return Err(Invalid::new("actor", "must be 1 to 128 characters"));
        }
        if let Some(c) = v
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
        {
            return Err(Invalid::new(
                "actor",
                format!("holds a character that is not allowed: {c:?}"),
            ));
        }
        Ok(())
    }
);

impl JobId {
    /// The job of a replica set, or of the config servers or a shard of a cluster.
    pub fn of(project: &ProjectId, deployment: &DeploymentName, part: Option<&str>) -> JobId {
        // Safe: every part is an already validated token.
        match part {
            None => JobId(format!("{project}/{deployment}")),
            Some(p) => JobId(format!("{project}/{deployment}/{p}")),
        }
    }

    /// The project the job belongs to (its first part).
    pub fn project(&self) -> ProjectId {
        // Safe: validated on construction to start with a project token.
        ProjectId(self.0.split('/').next().unwrap_or_default().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_ids_follow_ops_manager_form() {
        assert!(DaemonId::new("backup1.example.net:/data/backup/").is_ok());
        assert!(DaemonId::new("host:/").is_ok());
        for bad in [
            "",
            "host",
            ":/data/",
            "host:/data",
            "host:data/",
            "host:/da ta/",
            "ho st:/data/",
            "host:/a/../b/",
            "host:/data/*/",
            "host:/data/>/",
        ] {
            assert!(DaemonId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DaemonId::new(format!("h:/{}/", "a".repeat(300))).is_err());
    }

    #[test]
    fn job_ids_are_two_or_three_tokens() {
        assert!(JobId::new("p1/rs0").is_ok());
        assert!(JobId::new("p1/c1/shard0").is_ok());
        assert!(JobId::new("p1").is_err());
        assert!(JobId::new("p1/rs.0").is_err());
        assert!(JobId::new("p1/a/b/c").is_err());
        assert!(JobId::new("p1//x").is_err());
        assert_eq!(JobId::new("p1/rs0").unwrap().project().as_str(), "p1");
    }

    #[test]
    fn command_ids_are_ulids() {
        assert!(CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").is_ok());
        assert!(CommandId::new("01arz3ndektsv4rrffq69g5fav").is_err());
        assert!(CommandId::new("81ARZ3NDEKTSV4RRFFQ69G5FAV").is_err());
        assert!(CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FA").is_err());
        assert!(CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAI").is_err());
    }

    #[test]
    fn a_command_id_tells_its_time() {
        // The ULID specification's example.
        let id = CommandId::new("01ARYZ6S41TSV4RRFFQ69G5FAV").unwrap();
        assert_eq!(id.timestamp_ms(), 1_469_918_176_385);
        let last = CommandId::new("7ZZZZZZZZZZZZZZZZZZZZZZZZZ").unwrap();
        assert_eq!(last.timestamp_ms(), (1 << 48) - 1);
    }

    #[test]
    fn deserializing_validates() {
        let bad: Result<ProjectId, _> = serde_json::from_str("\"a.b\"");
        assert!(bad.is_err());
        let good: ProjectId = serde_json::from_str("\"proj-1\"").unwrap();
        assert_eq!(good.as_str(), "proj-1");
    }
}
