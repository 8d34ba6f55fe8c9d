//! The one wall clock and the one source of new command ids, so every process stamps and
//! names its commands the same way.

use handoff_domain::CommandId;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh command id: a ULID, so ids sort by the time they were made.
pub fn new_command_id() -> CommandId {
    // A ULID is 26 Crockford base-32 characters, which is exactly a command id's form.
    CommandId::new(ulid::Ulid::new().to_string()).expect("a ULID is a command id")
}
