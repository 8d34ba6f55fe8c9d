//! The domain core of handoff: which daemon owns which backup job, and how jobs move.
//!
//! Pure and deterministic: no I/O, no async, no clock, no logging. Time and the caller come
//! in with the command's [`Context`]; the current state comes in as a fold of the event
//! stream. It follows the decider pattern:
//!
//! ```text
//! decide(&Command, &Context, &State) -> Result<Decision, Rejection>
//! evolve(State, &Event) -> State        initial() -> State
//! ```
//!
//! # Layout
//! Each file imports only from the layers before it, never back up, so that a lower
//! layer reads and compiles without the ones above it and no cycle can creep in:
//!
//! ```text
//! ids -> model, rejection -> command, event -> alert -> state -> auth, decide
//! ```
//!
//! - [`ids`]: validated identifiers (daemons as Ops Manager names them, `host:/dir/`),
//!   and [`Invalid`], the error of a field that lacks its form.
//! - [`model`]: the values commands and events carry: daemon settings, deployments, job
//!   states and move phases, roles ([`Role`](model::Role)), and the alerts' names
//!   ([`AlertKind`](model::AlertKind), [`AlertKey`](model::AlertKey)).
//! - [`rejection`]: why a command was refused, each reason with its own variant.
//! - [`command`]: what callers ask for (`MoveJobs`, `MoveJob`, `CompleteJobMove`, ...).
//! - [`event`]: what happened (`JobMoveStarted`, `JobMoveFailed` = THEFT_FAILED, ...), each
//!   belonging to one aggregate (daemon, project, job, move).
//! - [`alert`]: which events raise and close each alert (DAEMON_DOWN, MOVE_STUCK, ...).
//! - [`state`]: the state (users and open alerts included) and `evolve`.
//! - [`auth`]: who may send which command (MISSION rule 1).
//! - [`decide`](mod@decide): the rules, one file per aggregate under `decide/`:
//!   `daemons`, `users`, `jobs` (with placement), `moves` (with the destination checks),
//!   `failover` and `alerts`; `decide/mod.rs` holds the entry point and dispatch.
//!
//! `Role`, `User`, `AlertKind`, `AlertKey` and `FLEET` moved down from [`auth`] and
//! [`alert`], and `Invalid` from [`rejection`]; those modules re-export them, so the
//! old paths keep working.
//!
//! # How a command flows
//! The command service validates the request into a [`Command`], calls [`decide()`] with
//! the state it folded from the stream, and appends the [`Decision`]'s units, each
//! atomically, with optimistic concurrency on every aggregate the events touch. A
//! rejection appends none of the command's events; the service records it as
//! `CommandRejected`, so the command id keeps that answer (decision 0010).

pub mod alert;
pub mod auth;
pub mod command;
pub mod decide;
pub mod event;
pub mod ids;
pub mod model;
pub mod rejection;
pub mod state;

pub use command::Command;
pub use decide::{decide, Context, Decision, MovePlan, MAX_EVENTS_PER_UNIT};
pub use event::{Aggregate, Event};
pub use ids::{Actor, CommandId, DaemonId, JobId, Label, MoveId, ProjectId, UserKey};
pub use rejection::{Invalid, Rejection, RejectionClass};
pub use state::{evolve, initial, State};
