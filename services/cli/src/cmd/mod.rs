//! The operator's subcommands, one module per group.

pub mod data;
pub mod drain;
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

/// How much of a list to show: one page (`--limit`, from `--cursor`) or all of it.
#[derive(Debug, Clone, clap::Args)]
pub struct Paging {
    /// Items per page (1 to 1000).
    #[arg(long, default_value_t = handoff_protocol::api::query::DEFAULT_LIMIT)]
    pub limit: u32,
    /// Every page, one after another.
    #[arg(long, conflicts_with = "cursor")]
    pub all: bool,
    /// Start after the page that gave this cursor.
    #[arg(long)]
    pub cursor: Option<String>,
}

impl Default for Paging {
    fn default() -> Self {
        Paging {
            limit: handoff_protocol::api::query::DEFAULT_LIMIT,
            all: false,
            cursor: None,
        }
    }
}

/// Prints how much of the list was shown, and how to see the rest.
pub fn print_count<T>(page: &handoff_protocol::api::query::Page<T>, what: &str) {
    let shown = page.items.len();
    match &page.next {
        Some(next) => println!(
            "\n{shown} of {} {what}; the next page: --cursor {next} (or --all)",
            page.total
        ),
        None => println!("\n{shown} of {} {what}", page.total),
    }
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
