//! What the end-to-end tests share: a stack of real parts (a nats-server from the test
//! kit, the command service, a projector), the `handoff` processes around it, and helpers
//! to send commands and queries and to read the stream back.
//!
//! Everything is re-exported from here: a test module says `use handoff_tests::*;`.
//!
//! # Layout
//! - `stack`: the in-process stack ([`Stack`], [`CommandService`], [`data_stack`]) and
//!   the [`owner`] every stack starts with.
//! - `client`: commands and queries over NATS ([`send_command`], [`request`],
//!   [`request_signed`], [`query`]), all through `handoff_client`.
//! - `fixtures`: ids and commands ([`daemon`], [`job`], [`register`], [`move_jobs`]...)
//!   and [`of_type`].
//! - `cli`: the `handoff` binary as a user runs it ([`handoff`], [`handoff_ok`],
//!   [`handoff_refused`], [`Run`]), in the background ([`Background`]) and as a whole
//!   `handoff up` ([`Up`]).
//! - `http`: plain HTTP requests to what `handoff` serves ([`http_get`], [`http_post_form`]).
//! - `browser`: headless Chromium through ChromeDriver ([`Browser`]), for the console.
//! - `procs`: the `handoff` services a story runs ([`Proc`], [`ProjectorProcess`]).
//! - `wait`: waiting for the projector and for an event, on the test kit's [`until`].
//! - `oplog`: a job's whole oplog as stored ([`scan_oplog`]).
//! - `story`: a module's story played once for all its tests ([`story_once`], [`Keep`]).
//!
//! A test waits by polling to a deadline ([`until`]), never by sleeping, and every child
//! process is a [`handoff_testkit::Child`]: it dies with the test.

mod browser;
mod cli;
mod client;
mod fixtures;
mod http;
mod oplog;
mod procs;
mod stack;
mod story;
mod wait;

use std::time::Duration;

pub use browser::Browser;
pub use cli::{
    console_addr, handoff, handoff_bin, handoff_ok, handoff_refused, Background, Run, Up,
};
pub use client::{query, request, request_signed, send_command};
pub use fixtures::*;
pub use handoff_testkit::{until, Signal};
pub use http::{http_get, http_get_as, http_post_form, http_request, Response};
pub use oplog::{scan_oplog, OplogScan};
pub use procs::{dump_views, Proc, ProjectorProcess};
pub use stack::{data_stack, owner, CommandService, Stack};
pub use story::{story_once, Keep};
pub use wait::{first_event, wait_for_checkpoint};

/// How long any wait in a test may take before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);
