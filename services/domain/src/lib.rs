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
//! - [`ids`]: validated identifiers (daemons as Ops Manager names them, `host:/dir/`).
//! - [`model`]: daemon settings, deployments, job states and move phases.
//! - [`command`]: what callers ask for (`MoveJobs`, `MoveJob`, `CompleteJobMove`, ...).
//! - [`event`]: what happened (`JobMoveStarted`, `JobMoveFailed` = THEFT_FAILED, ...), each
//!   belonging to one aggregate (daemon, project, job, move).
//! - [`state`]: the state and `evolve`.
//! - [`decide`](mod@decide): the rules, including placement and the destination checks
//!   of a move.
//! - [`rejection`]: why a command was refused, each reason with its own variant.
//! - [`auth`]: users, roles, and who may send which command (MISSION rule 1).
//! - [`alert`]: which events raise and close each alert (DAEMON_DOWN, MOVE_STUCK, ...).
//!
//! # How a command flows
//! The command service validates the request into a [`Command`], calls [`decide()`] with
//! the state it folded from the stream, and appends the [`Decision`]'s units, each
//! atomically, with optimistic concurrency on every aggregate the events touch. A
//! rejection appends nothing.

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
