//! The operator's subcommands, one module per group.

pub mod data;
pub mod fleet;
pub mod history;
pub mod monitor;
pub mod moves;
pub mod users;

use handoff_domain::CommandId;

use crate::Failure;

/// A new command id, or the one given with `--id` (to retry a command safely).
pub fn command_id(given: Option<String>) -> Result<CommandId, Failure> {
    let raw = given.unwrap_or_else(|| ulid::Ulid::new().to_string());
    CommandId::new(raw).map_err(|e| Failure::Usage(format!("--id: {e}")))
}

/// Prints a value as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("wire values serialize")
    );
}

/// Parses an id type from an argument, as a usage error.
pub fn parse_id<T, E: std::fmt::Display>(
    what: &str,
    raw: &str,
    new: impl Fn(String) -> Result<T, E>,
) -> Result<T, Failure> {
    new(raw.to_owned()).map_err(|e| Failure::Usage(format!("{what} {raw:?}: {e}")))
}
