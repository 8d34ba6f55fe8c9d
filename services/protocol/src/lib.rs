//! What travels on the wire, shared by the services, the CLI and other clients: subjects,
//! the event envelope, command requests and replies, queries, and error codes.
//!
//! # Layout
//! - [`subjects`]: the event stream's subjects (one per aggregate) and the command and
//!   query endpoints.
//! - [`envelope`]: an event as stored: type, version, data and who/when/which command;
//!   decoding reads older versions (upcasting).
//! - [`api`]: command requests, replies and error codes; query requests.
//! - [`auth`]: signed commands and credentials files.
//! - [`clock`]: the wall clock and new command ids.
//! - [`dataplane`]: the data plane's stores, records, oplog and snapshot formats.
//! - [`permissions`]: the nats-server authorization of each process role.
//! - [`views`]: what queries answer.
//! - [`schemas`]: the JSON Schema of everything above, as written to `schemas/`.

pub mod api;
pub mod auth;
pub mod clock;
pub mod dataplane;
pub mod envelope;
pub mod permissions;
pub mod schemas;
pub mod subjects;
pub mod views;

pub use api::{Applied, CommandRequest, ErrorBody, ErrorCode, Reply};
pub use clock::{new_command_id, now_ms};
pub use envelope::{DecodeError, EventEnvelope};
