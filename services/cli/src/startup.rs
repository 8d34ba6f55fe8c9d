//! How every service starts (command service, projector, agent, daemon, monitor): connect
//! to NATS, then open what the service needs, each step tried again and again with backoff
//! while it fails in a way that passes, until it succeeds or the process is told to stop
//! (Ctrl-C, SIGTERM; then it exits 0).
//!
//! A failure passes when it is a timeout, nobody answering, a store its owner has not
//! created yet, or JetStream saying "not now" (a node down, a stream's leader being
//! elected, a cluster short of peers: see [`transient`]). Anything else is final and ends
//! the process at once with its message: bad credentials, a permissions violation (which
//! JetStream reports to the connection while the request itself only times out, so the
//! connection's reports are watched), a malformed configuration, a newer stream version.
//! Each failed attempt is logged with the error and the pause before the next.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{
    AccountError, AccountErrorKind, CreateKeyValueError, CreateKeyValueErrorKind,
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, KeyValueError,
    ObjectStoreError, RequestError as JsRequestError, RequestErrorKind as JsRequestErrorKind,
};
use async_nats::jetstream::kv::{WatchError, WatchErrorKind};
use async_nats::{ConnectError, ConnectErrorKind, RequestError, RequestErrorKind};
use handoff_dataplane::store::StoreError;
use handoff_eventlog::fence::FenceError;
use handoff_eventlog::{AppendError, ReadError, ServerError};
use tokio::sync::watch;

use crate::{Context, Failure};

/// The error of one attempt, whatever the service.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The first pause between two attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Completes when the process is told to stop; every part that must stop then holds one.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Starts listening for Ctrl-C and SIGTERM.
    pub fn listen() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            // Ignored: nobody listens any more, so nothing is left to stop.
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// Completes once the process is told to stop.
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            // An error means the listener is gone with the runtime: stop as well.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// The permissions violations the server reported on a service's connection since the
/// last look (the first few: once the service runs, nobody looks, and they are only
/// logged).
#[derive(Clone, Default)]
struct Denials(Arc<Mutex<Vec<String>>>);

impl Denials {
    fn record(&self, e: String) {
        let mut denials = self.0.lock().expect("denials lock");
        if denials.len() < 8 {
            denials.push(e);
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("denials lock"))
    }
}

/// Pauses between attempts: doubling from [`FIRST_PAUSE`] to [`MAX_PAUSE`], each less a
/// random part of up to a quarter, so that processes restarted together do not retry in
/// step.
pub struct Backoff {
    next: Duration,
    random: std::collections::hash_map::RandomState,
    n: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_PAUSE,
            random: Default::default(),
            n: 0,
        }
    }
}

impl Backoff {
    /// The pause before the next attempt.
    pub fn pause(&mut self) -> Duration {
        use std::hash::BuildHasher;
        let full = self.next;
        self.next = (self.next * 2).min(MAX_PAUSE);
        self.n += 1;
        let spread = self.random.hash_one(self.n) % 1000;
        full - full / 4 * spread as u32 / 1000
    }
}

/// A service's start-up.
pub struct Startup {
    service: &'static str,
    shutdown: Shutdown,
    denials: Denials,
}

impl Startup {
    /// The start-up of `service` (named in messages), listening for Ctrl-C and SIGTERM
    /// from here on.
    pub fn new(service: &'static str) -> Startup {
        Startup {
            service,
            shutdown: Shutdown::listen(),
            denials: Denials::default(),
        }
    }

    /// The process's shutdown, for the service once it runs.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Connects to NATS as the process's NATS identity (`--nats-key`, else the
    /// credentials'), any server of the list; `None` if told to stop first. The server's
    /// reports to the connection are logged, and a permissions violation ends a failed
    /// start.
    pub async fn connect(&mut self, ctx: &Context) -> Result<Option<async_nats::Client>, Failure> {
        let addrs = crate::client::server_addrs(&ctx.url)?;
        let what = format!("connecting to NATS at {}", ctx.url);
        let (service, seed, denials) = (self.service, ctx.nats_seed.clone(), self.denials.clone());
        self.retry(&what, || {
            let options = match &seed {
                Some(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
                None => async_nats::ConnectOptions::new(),
            };
            let denials = denials.clone();
            let options = options
                .name(format!("handoff {service}"))
                .connection_timeout(Duration::from_secs(5))
                .event_callback(move |event| {
                    let denials = denials.clone();
                    async move { report(&denials, event) }
                });
            let addrs = addrs.clone();
            async move { Ok(options.connect(addrs).await?) }
        })
        .await
    }

    /// Runs `attempt` until it succeeds, again after a pause while it fails in a way that
    /// passes ([`transient`]); `None` if told to stop first. A failure that does not pass,
    /// or one with a permissions violation reported meanwhile, is final.
    pub async fn retry<T, F, Fut>(
        &mut self,
        what: &str,
        mut attempt: F,
    ) -> Result<Option<T>, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BoxError>>,
    {
        let mut backoff = Backoff::default();
        for n in 1u32.. {
            self.denials.take();
            let outcome = tokio::select! {
                r = attempt() => r,
                _ = self.shutdown.signalled() => return Ok(None),
            };
            let e = match outcome {
                Ok(started) => {
                    if n > 1 {
                        tracing::info!(attempts = n, "{what}: done");
                    }
                    return Ok(Some(started));
                }
                Err(e) => e,
            };
            let denied = self.denials.take();
            if let Some(d) = denied.first() {
                return Err(Failure::Usage(format!(
                    "{what}: {e} (the NATS server refused the {service}: {d}; its NATS key \
                     lacks a {service}'s permissions)",
                    service = self.service
                )));
            }
            if !transient(e.as_ref()) {
                return Err(Failure::Usage(format!("{what}: {e}")));
            }
            let pause = backoff.pause();
            tracing::warn!(
                attempt = n,
                retry_in_ms = pause.as_millis() as u64,
                error = %e,
                "{what} failed; trying again"
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.shutdown.signalled() => return Ok(None),
            }
        }
        unreachable!("the attempts go on until one returns")
    }
}

/// Logs what the server tells the connection, and keeps its permissions violations.
fn report(denials: &Denials, event: async_nats::Event) {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::Other(e))
            if e.starts_with("Permissions Violation") =>
        {
            tracing::error!(error = %e, "the NATS server refused this process");
            denials.record(e);
        }
        async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
        async_nats::Event::Connected => tracing::info!("connected to NATS"),
        other => tracing::debug!(event = %other, "NATS connection"),
    }
}

/// A store a service binds to is not there yet.
#[derive(Debug, thiserror::Error)]
#[error("{store} does not exist yet ({owner} creates it)")]
pub struct Missing {
    pub store: &'static str,
    pub owner: &'static str,
}

/// Fails with [`Missing`] while the event stream does not exist: a reader (the projector)
/// must not attach first, as attaching to a missing stream tries to create it, which only
/// the command service may.
pub async fn event_stream_exists(client: &async_nats::Client) -> Result<(), BoxError> {
    let js = async_nats::jetstream::new(client.clone());
    match js.get_stream(handoff_protocol::subjects::STREAM).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
            if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Err(Missing {
                store: "the event stream",
                owner: "the command service",
            }
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a failed start may succeed later: the first part of `e`'s chain (it, its
/// source, the source's source...) that can tell decides; none can: it does not.
pub fn transient(e: &(dyn StdError + 'static)) -> bool {
    let mut link = Some(e);
    while let Some(e) = link {
        if let Some(verdict) = verdict(e) {
            return verdict;
        }
        link = e.source();
    }
    false
}

/// What one error says about passing, if it can tell by itself.
fn verdict(e: &(dyn StdError + 'static)) -> Option<bool> {
    // Ours, by variant.
    if e.is::<Missing>() {
        return Some(true);
    }
    if let Some(e) = e.downcast_ref::<StoreError>() {
        return match e {
            StoreError::Unavailable(_) | StoreError::Missing { .. } => Some(true),
            StoreError::Create { .. } => None,
            StoreError::MissingSnapshot(_) | StoreError::Invalid(_) | StoreError::Fenced(_) => {
                Some(false)
            }
        };
    }
    if let Some(e) = e.downcast_ref::<FenceError>() {
        return match e {
            FenceError::Unavailable(_) | FenceError::Missing => Some(true),
            FenceError::Create { .. } => None,
            FenceError::Stale { .. } | FenceError::Corrupt { .. } => Some(false),
        };
    }
    if let Some(e) = e.downcast_ref::<handoff_monitor::Error>() {
        return e.is_transient();
    }
    if let Some(e) = e.downcast_ref::<ReadError>() {
        return Some(read(e));
    }
    if let Some(e) = e.downcast_ref::<AppendError>() {
        return Some(matches!(e, AppendError::Unavailable(_)));
    }
    // The services' own errors: a transparent variant's source is its inner error's
    // source, so the inner error is read here; some carry only a message.
    if let Some(e) = e.downcast_ref::<handoff_command::Error>() {
        return match e {
            handoff_command::Error::Open(_) => None,
            handoff_command::Error::Read(r) => Some(read(r)),
            handoff_command::Error::Service(m) => Some(says_transient(m)),
        };
    }
    if let Some(e) = e.downcast_ref::<handoff_projector::Error>() {
        return match e {
            handoff_projector::Error::Open(_) => None,
            handoff_projector::Error::Consumer(m) | handoff_projector::Error::Query(m) => {
                Some(says_transient(m))
            }
            handoff_projector::Error::Store(_)
            | handoff_projector::Error::Decode { .. }
            | handoff_projector::Error::Missing { .. } => Some(false),
        };
    }
    // NATS's, by kind.
    if let Some(e) = e.downcast_ref::<ConnectError>() {
        return Some(matches!(
            e.kind(),
            ConnectErrorKind::Io
                | ConnectErrorKind::TimedOut
                | ConnectErrorKind::Dns
                | ConnectErrorKind::MaxReconnects
        ));
    }
    if let Some(e) = e.downcast_ref::<RequestError>() {
        return Some(matches!(
            e.kind(),
            RequestErrorKind::TimedOut | RequestErrorKind::NoResponders | RequestErrorKind::Other
        ));
    }
    if let Some(e) = e.downcast_ref::<JsRequestError>() {
        return Some(matches!(
            e.kind(),
            JsRequestErrorKind::TimedOut
                | JsRequestErrorKind::NoResponders
                | JsRequestErrorKind::Other
        ));
    }
    if let Some(e) = e.downcast_ref::<AccountError>() {
        return Some(match e.kind() {
            AccountErrorKind::JetStream(j) => api(&j),
            AccountErrorKind::TimedOut
            | AccountErrorKind::JetStreamUnavailable
            | AccountErrorKind::Other => true,
        });
    }
    if let Some(e) = e.downcast_ref::<CreateStreamError>() {
        return match e.kind() {
            CreateStreamErrorKind::TimedOut
            | CreateStreamErrorKind::JetStreamUnavailable
            | CreateStreamErrorKind::NotFound => Some(true),
            CreateStreamErrorKind::JetStream(j) => Some(api(&j)),
            CreateStreamErrorKind::Response => None,
            _ => Some(false),
        };
    }
    if let Some(e) = e.downcast_ref::<GetStreamError>() {
        return match e.kind() {
            GetStreamErrorKind::Request => None,
            GetStreamErrorKind::JetStream(j) => Some(api(&j)),
            _ => Some(false),
        };
    }
    if let Some(e) = e.downcast_ref::<CreateKeyValueError>() {
        return match e.kind() {
            CreateKeyValueErrorKind::TimedOut => Some(true),
            CreateKeyValueErrorKind::JetStream | CreateKeyValueErrorKind::BucketCreate => None,
            _ => Some(false),
        };
    }
    if e.is::<KeyValueError>() || e.is::<ObjectStoreError>() {
        // Getting a store: its source (the stream's info) tells.
        return e.source().is_none().then_some(false);
    }
    if let Some(e) = e.downcast_ref::<WatchError>() {
        return match e.kind() {
            WatchErrorKind::TimedOut => Some(true),
            WatchErrorKind::ConsumerCreate | WatchErrorKind::Other => None,
            WatchErrorKind::InvalidKey => Some(false),
        };
    }
    if let Some(j) = e.downcast_ref::<async_nats::jetstream::Error>() {
        return Some(api(j));
    }
    None
}

fn read(e: &ReadError) -> bool {
    matches!(e, ReadError::Unavailable(_))
}

/// JetStream's answer passes: "not now" (503, a timeout), the codes the event log takes
/// for transient, no peers for the replicas yet (10005: a node is down), and a stream
/// not there yet (10059: its owner creates it).
fn api(e: &async_nats::jetstream::Error) -> bool {
    let code = e.error_code().0;
    e.code() == 503
        || e.code() == 408
        || handoff_eventlog::classify(code) == ServerError::Transient
        || code == 10005
        || code == 10059
}

/// For errors that carry only a message: the words of a failure that passes.
fn says_transient(message: &str) -> bool {
    let m = message.to_lowercase();
    ["timed out", "no responders", "unavailable", "(code 503,"]
        .iter()
        .any(|w| m.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout or an unavailable store passes, wherever it sits in the chain; a
    /// fenced write or a conflicting configuration does not.
    #[test]
    fn tells_what_passes() {
        let timeout = CreateStreamError::new(CreateStreamErrorKind::TimedOut);
        assert!(transient(&timeout));
        let open = handoff_command::Error::Open(handoff_eventlog::OpenError::Stream {
            stream: "HANDOFF_EVENTS".into(),
            source: Box::new(timeout),
        });
        assert!(transient(&open));
        let missing = StoreError::Missing {
            store: "HANDOFF_OPLOG",
            owner: "the agent",
        };
        assert!(transient(&missing));
        let created = StoreError::Create {
            store: "HANDOFF_OPLOG",
            source: Box::new(CreateStreamError::new(CreateStreamErrorKind::TimedOut)),
        };
        assert!(transient(&created));
        assert!(!transient(&StoreError::Fenced("stale".into())));
        assert!(!transient(&CreateStreamError::new(
            CreateStreamErrorKind::InvalidStreamName
        )));
        assert!(transient(&handoff_command::Error::Service(
            "the fences are unavailable: timed out".into()
        )));
        assert!(!transient(&handoff_command::Error::Service(
            "adding the first owner: forbidden".into()
        )));
        assert!(!transient(&ConnectError::new(
            ConnectErrorKind::AuthorizationViolation
        )));
        assert!(transient(&ConnectError::new(ConnectErrorKind::Io)));
    }

    /// Pauses grow to the most and never below three quarters of their nominal length.
    #[test]
    fn pauses_double_up_to_the_most() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..8).map(|_| b.pause()).collect();
        let nominal = [250, 500, 1000, 2000, 4000, 5000, 5000, 5000];
        for (p, n) in pauses.iter().zip(nominal) {
            let n = Duration::from_millis(n);
            assert!(*p <= n && *p >= n * 3 / 4, "{p:?} for {n:?}");
        }
    }
}
