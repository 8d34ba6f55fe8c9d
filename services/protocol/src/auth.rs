//! Signed commands. Every command request is signed with its user's nkeys (ed25519) key;
//! the command service verifies the signature against the key the events gave the user.
//!
//! # What is signed
//! The exact bytes sent, never a re-serialization: `handoff-command-v1\n`, the endpoint
//! subject, `\n`, then the request body. The body carries the command id (the nonce), the
//! user, the time it was signed (`at`, milliseconds since the Unix epoch) and the command.
//! The signature travels in the [`SIGNATURE_HEADER`] header, hex encoded. A signature
//! binds the command to one endpoint, one user, one id and one moment.
//!
//! # Credentials files
//! JSON, written 0600 and refused when others may read them:
//! `{"user": NAME, "seed": "SU...", "nats_seed": "SU..."}`. `seed` signs commands;
//! `nats_seed`, when present, is the NATS identity the process connects with (see
//! [`crate::permissions`]). Neither seed is ever printed or logged: `Debug` hides them.

use std::io::Write as _;
use std::path::Path;

use handoff_domain::{Actor, Command, CommandId, UserKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{encode_request_at, endpoint_of};
use crate::subjects;

/// The header that carries a request's signature (hex).
pub const SIGNATURE_HEADER: &str = "Handoff-Signature";

/// Prefix of the signed bytes: a signature for anything else never verifies as a command.
const DOMAIN: &[u8] = b"handoff-command-v1\n";

/// The bytes a request's signature covers.
pub fn signed_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + subject.len() + 1 + payload.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(subject.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read credentials {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("credentials {path} are malformed: {detail}")]
    Malformed { path: String, detail: String },
    #[error("credentials {path} may be read by others (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
    #[error("cannot write credentials {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

/// A user's credentials: its name and the seeds of its keys.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: Actor,
    seed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nats_seed: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("key", &self.public_key().as_str())
            .field("seed", &"<hidden>")
            .field("nats_seed", &self.nats_seed.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// A request ready to send: its subject, its body and the signature header's value.
#[derive(Clone, Debug)]
pub struct SignedRequest {
    pub subject: String,
    pub payload: Vec<u8>,
    pub signature: String,
}

fn malformed(path: &Path, detail: impl ToString) -> CredentialsError {
    CredentialsError::Malformed {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// A new user seed ("SU...").
pub fn new_seed() -> String {
    nkeys::KeyPair::new_user()
        .seed()
        .expect("a generated key pair has its seed")
}

/// The public key of a user seed.
pub fn public_key_of(seed: &str) -> Result<String, String> {
    nkeys::KeyPair::from_seed(seed)
        .map(|k| k.public_key())
        .map_err(|e| format!("not an nkeys seed: {e}"))
}

impl Credentials {
    /// New credentials for `user` with a fresh key.
    pub fn generate(user: Actor, nats_seed: Option<String>) -> Self {
        Credentials {
            user,
            seed: new_seed(),
            nats_seed,
        }
    }

    /// Credentials from a user and a seed (checked).
    pub fn from_seed(user: Actor, seed: String, nats_seed: Option<String>) -> Result<Self, String> {
        public_key_of(&seed)?;
        if let Some(n) = &nats_seed {
            public_key_of(n)?;
        }
        Ok(Credentials {
            user,
            seed,
            nats_seed,
        })
    }

    fn key_pair(&self) -> nkeys::KeyPair {
        // Safe: the seed was checked when the credentials were built or read.
        nkeys::KeyPair::from_seed(&self.seed).expect("a checked seed")
    }

    /// The public key the user is known by.
    pub fn public_key(&self) -> UserKey {
        UserKey::new(self.key_pair().public_key()).expect("nkeys user keys are valid user keys")
    }

    /// The seed of the NATS identity to connect with, if the file has one.
    pub fn nats_seed(&self) -> Option<&str> {
        self.nats_seed.as_deref()
    }

    /// Reads a credentials file, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        use std::os::unix::fs::PermissionsExt as _;
        let read = |error| CredentialsError::Read {
            path: path.display().to_string(),
            error,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
        let text = std::fs::read(path).map_err(read)?;
        let c: Credentials = serde_json::from_slice(&text).map_err(|e| malformed(path, e))?;
        Credentials::from_seed(c.user, c.seed, c.nats_seed).map_err(|e| malformed(path, e))
    }

    /// Writes the credentials to a new file, readable by its owner only. An existing
    /// file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), CredentialsError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let write = |error| CredentialsError::Write {
            path: path.display().to_string(),
            error,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write)?;
        let mut text = serde_json::to_vec_pretty(self).expect("credentials serialize");
        text.push(b'\n');
        file.write_all(&text).map_err(write)?;
        file.sync_all().map_err(write)
    }

    /// Signs `payload` as a request on `subject`.
    pub fn sign(&self, subject: &str, payload: &[u8]) -> String {
        let signature = self
            .key_pair()
            .sign(&signed_bytes(subject, payload))
            .expect("a seeded key pair signs");
        hex(&signature)
    }

    /// The signed request of `command` with id `id`, signed now.
    pub fn sign_command(
        &self,
        id: &CommandId,
        command: &Command,
        client: Option<&str>,
    ) -> SignedRequest {
        self.sign_command_at(id, command, now_ms(), client)
    }

    /// The signed request of `command`, signed as if at `at_ms`.
    pub fn sign_command_at(
        &self,
        id: &CommandId,
        command: &Command,
        at_ms: u64,
        client: Option<&str>,
    ) -> SignedRequest {
        let subject = subjects::command(endpoint_of(command));
        let payload = encode_request_at(id, &self.user, at_ms, client, command);
        let signature = self.sign(&subject, &payload);
        SignedRequest {
            subject,
            payload,
            signature,
        }
    }
}

/// Why a signature does not verify.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BadSignature {
    #[error("the signature is not 128 hex digits")]
    Malformed,
    #[error("the signature does not match the request and the user's key")]
    Mismatch,
}

/// Checks `signature` (hex) over a request on `subject` against `key`.
pub fn verify(
    key: &UserKey,
    subject: &str,
    payload: &[u8],
    signature: &str,
) -> Result<(), BadSignature> {
    let sig = unhex(signature)
        .filter(|s| s.len() == 64)
        .ok_or(BadSignature::Malformed)?;
    let public =
        nkeys::KeyPair::from_public_key(key.as_str()).map_err(|_| BadSignature::Mismatch)?;
    public
        .verify(&signed_bytes(subject, payload), &sig)
        .map_err(|_| BadSignature::Mismatch)
}

/// A short, stable fingerprint of a signature: what the events record of it, so a
/// replayed request is recognised by every instance of the command service.
pub fn fingerprint(signature: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in signature.to_ascii_lowercase().bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

pub use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_domain::command::RemoveDaemon;
    use handoff_domain::DaemonId;

    fn creds(name: &str) -> Credentials {
        Credentials::generate(Actor::new(name).unwrap(), None)
    }

    fn command() -> Command {
        Command::RemoveDaemon(RemoveDaemon {
            daemon: DaemonId::new("h:/d/").unwrap(),
        })
    }

    #[test]
    fn a_signature_verifies_only_for_its_bytes_subject_and_key() {
        let alice = creds("alice");
        let id = CommandId::new("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let r = alice.sign_command(&id, &command(), Some("test"));
        let key = alice.public_key();
        assert_eq!(verify(&key, &r.subject, &r.payload, &r.signature), Ok(()));
        let mut tampered = r.payload.clone();
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert_eq!(
            verify(&key, &r.subject, &tampered, &r.signature),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(
            verify(&key, "handoff.cmd.move-jobs", &r.payload, &r.signature),
            Err(BadSignature::Mismatch)
        );
        let mallory = creds("mallory").public_key();
        assert_eq!(
            verify(&mallory, &r.subject, &r.payload, &r.signature),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(
            verify(&key, &r.subject, &r.payload, "zz"),
            Err(BadSignature::Malformed)
        );
    }

    #[test]
    fn files_are_private_and_debug_hides_the_seeds() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.creds");
        let alice = Credentials::generate(Actor::new("alice").unwrap(), Some(new_seed()));
        alice.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            alice.write_new(&path).is_err(),
            "an existing file was overwritten"
        );
        let read = Credentials::load(&path).unwrap();
        assert_eq!(read.public_key(), alice.public_key());
        let shown = format!("{read:?}");
        assert!(!shown.contains(&alice.seed) && !shown.contains(alice.nats_seed().unwrap()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::Exposed { mode: 0o644, .. })
        ));
    }
}
