//! The command service: the only writer of the event stream.
//!
//! It is a NATS micro service (`handoff-command`, discoverable with `$SRV.PING` and
//! reporting stats) with one endpoint per command under `handoff.cmd.` (see
//! `handoff_protocol::api::ENDPOINTS`). Any number of instances may run: they share a
//! queue group, and optimistic concurrency on the stream keeps them consistent.
//!
//! # How a command flows
//! 1. The endpoint refuses an oversize or malformed request with a `validation` error.
//! 2. The model catches up with the stream's end, then the request's signature is
//!    checked (see `handoff_protocol::auth`): a current user's key over the exact bytes,
//!    fresh, never seen before, and the user's roles allow the command
//!    (`handoff_domain::auth`). A refusal (`forbidden`) is itself appended as a
//!    `CommandRefused` event, and nothing else is.
//! 3. The [`executor`] catches its [`model`] up with what it appended before, and
//!    answers a command id it already applied with the events of the first time, and
//!    one it already rejected with the same rejection. An event the model cannot fold
//!    (undecodable, or not the next sequence) stops it for good: from then on every
//!    command is answered `model_stopped` with the event named, and nothing is decided
//!    on a model with a hole.
//! 4. `handoff_domain::decide` returns the events (in atomic units) or a rejection. A
//!    rejection is recorded as `CommandRejected` before it is answered, so every later
//!    attempt of the id, through any instance, gets it too (decision 0010).
//! 5. Each unit is appended as one atomic batch, every event expecting its subject's
//!    last sequence as the model saw it (or, for a rule that reads many aggregates, the
//!    last sequence of all of them: see `executor::guard_of`); the first unit also
//!    holds the command's `CommandAccepted`, which loses to a rejection of the id
//!    recorded meanwhile. On a conflict the model catches up with the stream and the
//!    command is decided again.
//! 6. The reply goes out only after JetStream acknowledged every event.
//! 7. A job given a new epoch has its fence raised (`handoff_eventlog::fence`), in the
//!    background once the events are appended, so the data plane's stores refuse its
//!    previous owner's writes from then on.
//!
//! A move appended in part (cut between two of its units) and left by its caller is
//! finished by the service itself, at start and every [`Config::interrupted_after`];
//! while it cannot be, it raises MOVE_INTERRUPTED (`Executor::finish_interrupted`,
//! decision 0009).
//!
//! A drain in progress is moved along by the service too: its next job's move starts
//! when fewer than its limit are moving, and it ends when nothing is left
//! (`Executor::step_drains`, every [`DRAIN_STEP_INTERVAL`] while one is).
//!
//! # Layout
//! - [`model`]: the fold of the stream the decisions are made on.
//! - [`executor`]: one command at a time: decide, append, retry on conflict.

pub mod archive;
pub mod executor;
pub mod model;
pub mod telemetry;

use std::future::Future;
use std::time::Duration;

use async_nats::service::ServiceExt;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use handoff_domain::{Actor, Command, UserKey};
use handoff_eventlog::EventLog;
use handoff_protocol::api::{
    Applied, CommandRequest, Endpoint, ENDPOINTS, MAX_CLIENT, MAX_REQUEST_BYTES,
};
use handoff_protocol::{subjects, ErrorBody, ErrorCode, Reply};
use thiserror::Error;
use tracing::Instrument;

pub use executor::Executor;

/// The micro service's name.
pub const SERVICE_NAME: &str = "handoff-command";

/// How often the service looks at the drains in progress, to start their next moves.
pub const DRAIN_STEP_INTERVAL: Duration = Duration::from_millis(200);

/// The command service's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub event_log: handoff_eventlog::Config,
    /// How long to wait for the stream to deliver an event the service knows exists.
    pub read_timeout: Duration,
    /// How far a request's signing time may be from the service's clock.
    pub freshness: Duration,
    /// The first GLOBAL_OWNER, added when the service starts on a stream that never had
    /// a user (ignored once one was added).
    pub bootstrap_owner: Option<(Actor, UserKey)>,
    /// At most this many refusals a second are recorded as events; more are only logged
    /// (a flood of bad requests does not flood the stream).
    pub refusals_per_second: u32,
    /// A command appended in part (a move of several atomic units cut between two) and
    /// left alone this long is finished by the service itself; while it cannot be, the
    /// move is MOVE_INTERRUPTED. Also how often the service looks for such commands.
    pub interrupted_after: Duration,
    /// Keep the model small and start from its snapshot: recent command ids in memory,
    /// older ones in the command archive (`archive`). Off, the service folds the whole
    /// stream at start and keeps every id in memory.
    pub bounded: bool,
    /// How many recent commands' events the model keeps in memory (in events).
    pub window: u64,
    /// How often the service considers saving its model, and how many new events make
    /// it worth saving. It is also saved when the service stops.
    pub snapshot_interval: Duration,
    pub snapshot_after_events: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            event_log: handoff_eventlog::Config::default(),
            read_timeout: Duration::from_secs(10),
            freshness: Duration::from_secs(120),
            bootstrap_owner: None,
            refusals_per_second: 50,
            interrupted_after: Duration::from_secs(30),
            bounded: true,
            window: model::Config::default().window,
            snapshot_interval: Duration::from_secs(60),
            snapshot_after_events: 10_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] handoff_eventlog::OpenError),
    #[error(transparent)]
    Read(#[from] handoff_eventlog::ReadError),
    #[error("cannot start the micro service: {0}")]
    Service(String),
}

/// A started command service: its model is loaded and its endpoints are listening.
pub struct CommandService {
    executor: Executor,
    config: Config,
    /// Its connection: the server's payload limit bounds every reply.
    client: Client,
    service: async_nats::service::Service,
    endpoints: Vec<(Endpoint, async_nats::service::endpoint::Endpoint)>,
}

/// Loads the model from the stream and registers the endpoints.
pub async fn start(client: Client, config: Config) -> Result<CommandService, Error> {
    let log = EventLog::open(client.clone(), config.event_log.clone()).await?;
    let fences = handoff_eventlog::fence::Fences::open(log.jetstream(), config.event_log.replicas)
        .await
        .map_err(|e| Error::Service(e.to_string()))?;
    let stores = if config.bounded {
        let js = log.jetstream();
        let replicas = config.event_log.replicas;
        let archive = archive::Archive::open(js, replicas)
            .await
            .map_err(|e| Error::Service(e.to_string()))?;
        Some(executor::Stores {
            lineage: archive::Lineage::of(&archive),
            archive,
            snapshots: archive::Snapshots::open(js, replicas)
                .await
                .map_err(|e| Error::Service(e.to_string()))?,
            model: model::Config {
                window: config.window.max(1),
            },
        })
    } else {
        None
    };
    let mut executor = Executor::start_with(log, config.read_timeout, stores)
        .await?
        .with_fences(fences);
    if let Some(why) = executor.stopped() {
        tracing::error!(reason = %why.message, "the command model is stopped: every command is answered with the reason");
    } else if let Some((user, key)) = &config.bootstrap_owner {
        match executor.bootstrap_owner(user, key).await {
            Ok(true) => tracing::info!(%user, "added the first GLOBAL_OWNER"),
            Ok(false) => tracing::debug!(%user, "users exist; the first owner is not added again"),
            Err(e) => {
                return Err(Error::Service(format!(
                    "adding the first owner: {}",
                    e.message
                )))
            }
        }
    }
    let service = client
        .service_builder()
        .description(
            "handoff commands: register daemons, configure projects, create jobs, move jobs",
        )
        .queue_group("handoff-command")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| Error::Service(e.to_string()))?;
    let group = service.group(subjects::COMMANDS);
    let mut endpoints = Vec::new();
    for e in ENDPOINTS {
        let listening = group
            .endpoint(e.name)
            .await
            .map_err(|err| Error::Service(err.to_string()))?;
        endpoints.push((*e, listening));
    }
    // A round trip through the server: it handles this connection's messages in order,
    // so once our ping is answered it holds the endpoints' subscriptions, and a request
    // sent right after start returns finds a responder.
    client
        .request(format!("$SRV.PING.{SERVICE_NAME}"), bytes::Bytes::new())
        .await
        .map_err(|e| Error::Service(e.to_string()))?;
    Ok(CommandService {
        executor,
        config,
        client,
        service,
        endpoints,
    })
}

impl CommandService {
    /// The executor and its model, as started.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Serves commands until `shutdown` completes, then stops the endpoints.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let CommandService {
            mut executor,
            config,
            client,
            service,
            endpoints,
        } = self;
        let mut refusals = RefusalBudget::new(config.refusals_per_second);
        let mut requests = futures::stream::select_all(
            endpoints
                .into_iter()
                .map(|(def, ep)| ep.map(move |r| (def, r)).boxed()),
        );
        // At start, then every `interrupted_after`: commands appended in part and left.
        let mut finishing = tokio::time::interval(
            config
                .interrupted_after
                .max(std::time::Duration::from_millis(100)),
        );
        finishing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While a drain is in progress: its next moves, as earlier ones end.
        let mut draining = tokio::time::interval(DRAIN_STEP_INTERVAL);
        draining.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saving =
            tokio::time::interval(config.snapshot_interval.max(Duration::from_millis(100)));
        saving.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                // Folding first keeps the model close to the stream's end however many
                // requests wait (each still reads the stream's end before it is
                // authorized). A stopped model folds nothing more; commands hear why.
                folded = executor.fold_next(), if !executor.is_stopped() => folded?,
                // Before requests, so a flood of them cannot hold it back; a call with
                // nothing appended in part costs nothing.
                _ = finishing.tick() => {
                    executor.finish_interrupted(config.interrupted_after).await;
                }
                _ = draining.tick(), if executor.draining() => {
                    executor.step_drains().await;
                }
                // Serialised here, stored in the background.
                _ = saving.tick() => {
                    executor.save_snapshot(config.snapshot_after_events);
                }
                next = requests.next() => {
                    let Some((endpoint, request)) = next else { break };
                    let signature = request
                        .message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(handoff_protocol::auth::SIGNATURE_HEADER))
                        .map(|v| v.as_str().to_owned());
                    let signed = executor::Signed {
                        subject: request.message.subject.as_str(),
                        payload: &request.message.payload,
                        signature: signature.as_deref(),
                    };
                    let started = std::time::Instant::now();
                    let reply = handle(&mut executor, &config, &mut refusals, endpoint, &signed).await;
                    telemetry::answered(endpoint.name, &reply, started.elapsed().as_secs_f64());
                    let body = fit(&reply, client.max_payload());
                    if let Err(e) = request.respond(Ok(Bytes::from(body))).await {
                        tracing::warn!(error = %e, "could not send a reply");
                    }
                }
            }
            // After the reply: the fences' and the archive's writes go out on the
            // connection behind it.
            executor.after_turn();
        }
        // Ignored: stopping only unsubscribes; the process is going away either way.
        let _ = service.stop().await;
        // Saved on the way out, so the next start folds next to nothing.
        executor.save_on_stop(Duration::from_secs(30)).await;
        Ok(())
    }
}

/// Adds the job, daemon and move a command is about to the span, for searching logs.
fn record_subjects(span: &tracing::Span, request: &handoff_protocol::CommandRequest<Command>) {
    use handoff_domain::Command as C;
    let (job, daemon, move_id) = match &request.command {
        C::RegisterDaemon(c) => (None, Some(&c.daemon), None),
        C::ConfigureDaemon(c) => (None, Some(&c.daemon), None),
        C::RemoveDaemon(c) => (None, Some(&c.daemon), None),
        C::ReportDaemonLiveness(c) => (None, Some(&c.daemon), None),
        C::ConfigureProject(_) | C::CreateBackupJobs(_) => (None, None, None),
        C::MoveJobs(c) => (None, Some(&c.from), Some(&request.id)),
        C::MoveJob(c) => (Some(&c.job), Some(&c.to), Some(&request.id)),
        C::SpreadJobs(c) => (None, Some(&c.from), Some(&request.id)),
        C::ReportJobMovePhase(c) => (Some(&c.job), None, Some(&c.move_id)),
        C::CompleteJobMove(c) => (Some(&c.job), None, Some(&c.move_id)),
        C::FailJobMove(c) => (Some(&c.job), None, Some(&c.move_id)),
        C::CancelMove(c) => (None, None, Some(&c.move_id)),
        C::DrainDaemon(c) => (None, Some(&c.daemon), None),
        C::ContinueDrain(c) => (None, Some(&c.daemon), None),
        C::CancelDrain(c) => (None, Some(&c.daemon), None),
        C::ResizeOplogTtl(c) => (Some(&c.job), None, None),
        C::AddUser(_) | C::RemoveUser(_) | C::ReportFailoverGuard(_) => (None, None, None),
        C::ReportHeadSpace(c) => (None, Some(&c.daemon), None),
        C::ReportMoveStuck(c) => (Some(&c.job), None, Some(&c.move_id)),
        C::FailoverJob(c) => (Some(&c.job), Some(&c.from), Some(&request.id)),
    };
    if let Some(j) = job {
        span.record("job", tracing::field::display(j));
    }
    if let Some(d) = daemon {
        span.record("daemon", tracing::field::display(d));
    }
    if let Some(m) = move_id {
        span.record("move_id", tracing::field::display(m));
    }
}

/// Room kept in a reply for the message's own framing.
const REPLY_FRAME_BYTES: usize = 1024;

/// A reply's body within the server's payload limit: an answer too large to send (the
/// plan and events of a move of tens of thousands of jobs) becomes the error
/// `reply_too_large`, which says the command was applied and where to read it, never
/// silence. Retrying with the same id gives the same answer.
pub fn fit(reply: &Reply, max_payload: usize) -> Vec<u8> {
    let body = serde_json::to_vec(reply).expect("replies always serialize");
    let Reply::Ok(applied) = reply else {
        return body;
    };
    if body.len() + REPLY_FRAME_BYTES <= max_payload {
        return body;
    }
    let error = ErrorBody::new(
        ErrorCode::Validation,
        "reply_too_large",
        format!(
            "command {} was applied ({} events{}), but its reply of {} bytes is more than the \
             server's payload limit of {max_payload} allows: its events are in the stream \
             (`handoff history`), a move is read with `handoff move {}`",
            applied.command,
            applied.events.len(),
            if applied.duplicate {
                ", appended before"
            } else {
                ""
            },
            body.len(),
            applied.command,
        ),
    );
    serde_json::to_vec(&Reply::Error(error)).expect("replies always serialize")
}

/// Checks a request's size and shape before anything else looks at it: a body too large,
/// not the endpoint's request, or a command out of range is a validation error, with
/// nothing decided or appended.
pub fn screen(endpoint: &Endpoint, payload: &[u8]) -> Result<CommandRequest<Command>, ErrorBody> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::Validation,
            "too_large",
            format!(
                "request of {} bytes is larger than the limit of {MAX_REQUEST_BYTES}",
                payload.len()
            ),
        ));
    }
    let request = (endpoint.parse)(payload).map_err(|e| {
        ErrorBody::new(
            ErrorCode::Validation,
            "malformed",
            format!("malformed {} request: {e}", endpoint.name),
        )
    })?;
    if let Some(client) = &request.client {
        if client.chars().count() > MAX_CLIENT || client.chars().any(char::is_control) {
            return Err(ErrorBody::new(
                ErrorCode::Validation,
                "malformed",
                format!(
                    "malformed {} request: client must be at most {MAX_CLIENT} characters without control characters",
                    endpoint.name
                ),
            ));
        }
    }
    // What the types alone do not check (ranges, lengths): refused before anyone looks
    // at who signed it.
    request
        .command
        .validate()
        .map_err(|i| ErrorBody::from(handoff_domain::Rejection::Invalid(i)))?;
    Ok(request)
}

/// How many refusals may still be recorded this second.
struct RefusalBudget {
    per_second: u32,
    left: u32,
    second: u64,
    dropped: u64,
}

impl RefusalBudget {
    fn new(per_second: u32) -> Self {
        RefusalBudget {
            per_second,
            left: per_second,
            second: 0,
            dropped: 0,
        }
    }

    /// Whether one more refusal may be recorded now.
    fn take(&mut self) -> bool {
        let second = handoff_protocol::auth::now_ms() / 1000;
        if second != self.second {
            if self.dropped > 0 {
                tracing::warn!(
                    dropped = self.dropped,
                    "refusals not recorded as events (over the limit)"
                );
            }
            self.second = second;
            self.left = self.per_second;
            self.dropped = 0;
        }
        if self.left == 0 {
            self.dropped += 1;
            return false;
        }
        self.left -= 1;
        true
    }
}

async fn handle(
    executor: &mut Executor,
    config: &Config,
    refusals: &mut RefusalBudget,
    endpoint: Endpoint,
    signed: &executor::Signed<'_>,
) -> Reply {
    let request = match screen(&endpoint, signed.payload) {
        Ok(r) => r,
        Err(e) => return Reply::Error(e),
    };
    let span = tracing::info_span!(
        "command",
        command = %request.id,
        kind = request.command.name(),
        actor = %request.actor,
        job = tracing::field::Empty,
        daemon = tracing::field::Empty,
        move_id = tracing::field::Empty,
    );
    record_subjects(&span, &request);
    // Most commands are new and allowed: decided at once, with no read of the stream's end.
    if let Some(result) = executor
        .execute_fast(&request, signed, config.freshness)
        .instrument(span.clone())
        .await
    {
        let _entered = span.enter();
        return answer(result);
    }
    let fingerprint = match executor
        .authenticate(&request, signed, config.freshness)
        .instrument(span.clone())
        .await
    {
        Ok(f) => f,
        Err(error) => {
            let _entered = span.enter();
            tracing::warn!(code = ?error.code, reason = %error.reason, client = request.client.as_deref().unwrap_or(""), "refused");
            if error.code == ErrorCode::Forbidden && refusals.take() {
                if let Err(e) = executor.record_refusal(&request, &error).await {
                    tracing::warn!(error = %e.message, "could not record the refusal");
                }
            }
            return Reply::Error(error);
        }
    };
    let result = executor
        .execute(request, Some(fingerprint))
        .instrument(span.clone())
        .await;
    let _entered = span.enter();
    answer(result)
}

/// The reply to a command that was decided (logged in the command's span).
fn answer(result: Result<Applied, ErrorBody>) -> Reply {
    match result {
        Ok(applied) => {
            tracing::info!(
                events = applied.events.len(),
                duplicate = applied.duplicate,
                "applied"
            );
            Reply::Ok(applied)
        }
        Err(error) => {
            tracing::info!(code = ?error.code, reason = %error.reason, "not applied");
            Reply::Error(error)
        }
    }
}
