//! The generated NATS permissions, call by call: a nats-server runs the `authorization`
//! block that `handoff up` and `handoff nats-config` write, and every process role tries
//! every JetStream call handoff could make on every store, plus its commands and core
//! subjects. The outcome of each call, allowed or denied, must be exactly the table below
//! (the README's security section shows it).
//!
//! A call is allowed when the server answers it (an API error, a failed expectation and
//! "no responders" are answers: the request got past the permissions), denied when the
//! server reports a permissions violation for its subject. Every call is harmless when
//! allowed: creates and updates name another stream than their subject, purges are
//! malformed, message deletes name no message, consumer creates another stream, and every
//! publish to a stored subject expects a last sequence the subject does not have.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;

use anyhow::{bail, Context as _, Result};
use async_nats::HeaderMap;
use handoff_dataplane::store::Stores;
use handoff_domain::{DaemonId, JobId};
use handoff_eventlog::fence::Fences;
use handoff_eventlog::EventLog;
use handoff_natsd::{NatsProcess, Security};
use handoff_protocol::auth;
use handoff_protocol::dataplane::{
    self as dp, CONFIG_BUCKET, FENCES_BUCKET, HEADS_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET,
    OPLOG_STREAM, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET,
};
use handoff_protocol::permissions::{authorization, NatsUser, ProcessRole};
use handoff_protocol::subjects;
use tokio::sync::watch;

/// The roles, in the table's column order (the daemon column is daemon 1).
const ROLES: [&str; 6] = [
    "command service",
    "projector",
    "operator",
    "agent",
    "monitor",
    "daemon",
];

/// How long an answer to one call may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Calls in flight per role, well under the 128 server errors the client queues.
const CALLS_AT_ONCE: usize = 32;

/// One call and who may make it: `expected` has one letter per role in [`ROLES`] order
/// (`C P O A M D`), a dot where the role is denied.
struct Call {
    store: String,
    what: String,
    subject: String,
    body: Vec<u8>,
    headers: Option<HeaderMap>,
    expected: &'static str,
}

/// The calls, grouped by store.
struct Table {
    calls: Vec<Call>,
    store: String,
}

impl Table {
    fn store(&mut self, name: impl Into<String>) -> &mut Self {
        self.store = name.into();
        self
    }

    fn call(
        &mut self,
        what: impl Into<String>,
        subject: impl Into<String>,
        body: &str,
        expected: &'static str,
    ) -> &mut Self {
        assert_eq!(expected.len(), ROLES.len(), "a letter or a dot per role");
        self.calls.push(Call {
            store: self.store.clone(),
            what: what.into(),
            subject: subject.into(),
            body: body.as_bytes().to_vec(),
            headers: None,
            expected,
        });
        self
    }

    /// A publish to a stored subject, refused by the stream if it gets there: it expects
    /// a last sequence the subject does not have.
    fn write(
        &mut self,
        what: impl Into<String>,
        subject: impl Into<String>,
        expected: &'static str,
    ) -> &mut Self {
        self.call(what, subject, "{}", expected);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "999999999");
        self.calls.last_mut().expect("just pushed").headers = Some(headers);
        self
    }

    /// The stream calls on `stream`: `[create, update, delete, purge, info, msg delete]`.
    fn stream_calls(&mut self, stream: &str, expected: [&'static str; 6]) -> &mut Self {
        let api = |op: &str| format!("$JS.API.STREAM.{op}.{stream}");
        self.call("STREAM.CREATE", api("CREATE"), MISNAMED_STREAM, expected[0])
            .call("STREAM.UPDATE", api("UPDATE"), MISNAMED_STREAM, expected[1])
            .call("STREAM.DELETE", api("DELETE"), "", expected[2])
            .call("STREAM.PURGE", api("PURGE"), BAD_PURGE, expected[3])
            .call("STREAM.INFO", api("INFO"), "", expected[4])
            .call(
                "STREAM.MSG.DELETE",
                api("MSG.DELETE"),
                NO_SUCH_MSG,
                expected[5],
            )
    }
}

/// A stream create or update naming another stream than its subject: refused.
const MISNAMED_STREAM: &str = r#"{"name":"permissions_test_other"}"#;
/// A purge with both a sequence and a keep: a bad request, purging nothing.
const BAD_PURGE: &str = r#"{"seq":1,"keep":1}"#;
/// A message nobody stored.
const NO_SUCH_MSG: &str = r#"{"seq":999999999}"#;
/// A consumer create naming another stream than its subject: refused.
const MISNAMED_CONSUMER: &str = r#"{"stream_name":"permissions_test_other","config":{}}"#;
/// A consumer name nobody uses.
const NAME: &str = "permissions-test";

fn api(call: &str, stream: &str) -> String {
    format!("$JS.API.{call}.{stream}")
}

/// Every call, and who may make it.
fn table(d1: &DaemonId, d2: &DaemonId, job: &JobId) -> Vec<Call> {
    let events = subjects::STREAM;
    let snapshots = dp::object_stream(SNAPSHOT_BUCKET);
    let mut t = Table {
        calls: Vec::new(),
        store: String::new(),
    };
    //                                                              CPOAMD
    t.store("account")
        .call("account info", "$JS.API.INFO", "", "C..A..");

    t.store(format!("event stream {events}"))
        .stream_calls(
            events,
            ["C.....", "C.....", "......", "......", "CPOAMD", "......"],
        )
        .call(
            "STREAM.MSG.GET",
            api("STREAM.MSG.GET", events),
            NO_SUCH_MSG,
            "CP....",
        )
        .call(
            "DIRECT.GET (subject in the body)",
            api("DIRECT.GET", events),
            NO_SUCH_MSG,
            "C.....",
        )
        .call(
            "DIRECT.GET its own daemon subject",
            format!("{}.{}", api("DIRECT.GET", events), subjects::daemon(d1)),
            "",
            "C.O..D",
        )
        .call(
            "DIRECT.GET another daemon's subject",
            format!("{}.{}", api("DIRECT.GET", events), subjects::daemon(d2)),
            "",
            "C.O...",
        )
        .call(
            "DIRECT.GET the jobs' subjects",
            format!("{}.{}", api("DIRECT.GET", events), subjects::JOB_EVENTS),
            "",
            "C.OA.D",
        )
        .call(
            "DIRECT.GET the users' subjects",
            format!("{}.{}", api("DIRECT.GET", events), subjects::USERS),
            "",
            "C.O...",
        )
        .call(
            "CONSUMER.CREATE (filter in the body)",
            api("CONSUMER.CREATE", events),
            MISNAMED_CONSUMER,
            "C.O.M.",
        )
        .call(
            "CONSUMER.CREATE named, every subject",
            format!("{}.{NAME}", api("CONSUMER.CREATE", events)),
            MISNAMED_CONSUMER,
            "CPO.M.",
        )
        .call(
            "CONSUMER.CREATE on its own daemon subject",
            format!(
                "{}.{NAME}.{}",
                api("CONSUMER.CREATE", events),
                subjects::daemon(d1)
            ),
            MISNAMED_CONSUMER,
            "C.O.MD",
        )
        .call(
            "CONSUMER.CREATE on another daemon's subject",
            format!(
                "{}.{NAME}.{}",
                api("CONSUMER.CREATE", events),
                subjects::daemon(d2)
            ),
            MISNAMED_CONSUMER,
            "C.O.M.",
        )
        .call(
            "CONSUMER.CREATE on the jobs' subjects",
            format!(
                "{}.{NAME}.{}",
                api("CONSUMER.CREATE", events),
                subjects::JOB_EVENTS
            ),
            MISNAMED_CONSUMER,
            "C.OAMD",
        )
        .call(
            "CONSUMER.DURABLE.CREATE",
            format!("{}.{NAME}", api("CONSUMER.DURABLE.CREATE", events)),
            MISNAMED_CONSUMER,
            "......",
        )
        .call(
            "CONSUMER.MSG.NEXT",
            format!("{}.{NAME}", api("CONSUMER.MSG.NEXT", events)),
            "",
            "CPOAMD",
        )
        .call(
            "CONSUMER.INFO",
            format!("{}.{NAME}", api("CONSUMER.INFO", events)),
            "",
            "CPOAMD",
        )
        .call(
            "CONSUMER.DELETE",
            format!("{}.{NAME}", api("CONSUMER.DELETE", events)),
            "",
            "CP....",
        )
        .write("append an event", subjects::daemon(d1), "C.....")
        .call(
            "ack a message",
            format!("$JS.ACK.{events}.{NAME}.1.1.1.1.0"),
            "",
            "......",
        );

    t.store(format!("oplog store {OPLOG_STREAM}"))
        .stream_calls(
            OPLOG_STREAM,
            ["...A..", "......", "......", "...A..", "..OA.D", "......"],
        )
        .call(
            "DIRECT.GET (subject in the body)",
            api("DIRECT.GET", OPLOG_STREAM),
            NO_SUCH_MSG,
            "...A..",
        )
        .call(
            "DIRECT.GET a job's last message",
            format!(
                "{}.{}",
                api("DIRECT.GET", OPLOG_STREAM),
                subjects::oplog(job)
            ),
            "",
            "..OA.D",
        )
        .call(
            "CONSUMER.CREATE (filter in the body)",
            api("CONSUMER.CREATE", OPLOG_STREAM),
            MISNAMED_CONSUMER,
            "..OA.D",
        )
        .call(
            "CONSUMER.CREATE named, on a job's oplog",
            format!(
                "{}.{NAME}.{}",
                api("CONSUMER.CREATE", OPLOG_STREAM),
                subjects::oplog(job)
            ),
            MISNAMED_CONSUMER,
            "..OA.D",
        )
        .call(
            "CONSUMER.MSG.NEXT",
            format!("{}.{NAME}", api("CONSUMER.MSG.NEXT", OPLOG_STREAM)),
            "",
            "..OA.D",
        )
        .call(
            "CONSUMER.DELETE",
            format!("{}.{NAME}", api("CONSUMER.DELETE", OPLOG_STREAM)),
            "",
            "..OA.D",
        )
        .write("ship oplog", subjects::oplog(job), "...A..");

    t.store(format!("snapshot store {SNAPSHOT_BUCKET} ({snapshots})"))
        .stream_calls(
            &snapshots,
            ["...A..", "......", "......", "...A..", "..OA.D", "......"],
        )
        .call(
            "object info (DIRECT.GET of its metadata)",
            format!(
                "{}.$O.{SNAPSHOT_BUCKET}.M.{NAME}",
                api("DIRECT.GET", &snapshots)
            ),
            "",
            "..OA.D",
        )
        .call(
            "object list or read (CONSUMER.CREATE)",
            api("CONSUMER.CREATE", &snapshots),
            MISNAMED_CONSUMER,
            "..OA.D",
        )
        .call(
            "CONSUMER.DELETE",
            format!("{}.{NAME}", api("CONSUMER.DELETE", &snapshots)),
            "",
            "..OA.D",
        )
        .call(
            "flow control",
            format!("$JS.FC.{snapshots}.{NAME}.1"),
            "",
            "..OA.D",
        )
        .write(
            "object put: a chunk",
            format!("$O.{SNAPSHOT_BUCKET}.C.{NAME}"),
            "...A.D",
        )
        .write(
            "object put or delete: its metadata",
            format!("$O.{SNAPSHOT_BUCKET}.M.{NAME}"),
            "...A.D",
        );

    let index = dp::kv_stream(SNAPSHOT_INDEX_BUCKET);
    t.store(format!("snapshot index {SNAPSHOT_INDEX_BUCKET} ({index})"))
        .stream_calls(
            &index,
            ["...A..", "......", "......", "...A..", "..OA.D", "......"],
        )
        .call(
            "get an entry (DIRECT.GET)",
            format!(
                "{}.$KV.{SNAPSHOT_INDEX_BUCKET}.{NAME}",
                api("DIRECT.GET", &index)
            ),
            "",
            "...A.D",
        )
        .call(
            "CONSUMER.CREATE (filter in the body)",
            api("CONSUMER.CREATE", &index),
            MISNAMED_CONSUMER,
            "......",
        )
        .call(
            "list a job's snapshots (CONSUMER.CREATE with its keys)",
            format!(
                "{}.{NAME}.$KV.{SNAPSHOT_INDEX_BUCKET}.{}",
                api("CONSUMER.CREATE", &index),
                dp::snapshot_keys(job.as_str(), true).expect("a job")
            ),
            MISNAMED_CONSUMER,
            "..OA.D",
        )
        .call(
            "CONSUMER.MSG.NEXT",
            format!("{}.{NAME}", api("CONSUMER.MSG.NEXT", &index)),
            "",
            "..OA.D",
        )
        .call(
            "CONSUMER.DELETE",
            format!("{}.{NAME}", api("CONSUMER.DELETE", &index)),
            "",
            "..OA.D",
        )
        .write(
            "index a snapshot, or delete its entry",
            format!(
                "$KV.{SNAPSHOT_INDEX_BUCKET}.{}",
                dp::snapshot_key(job, "01J00000000000000000000000")
            ),
            "...A.D",
        );

    let bucket = |t: &mut Table,
                  name: &str,
                  create: &'static str,
                  info: &'static str,
                  get: &'static str,
                  watch: &'static str| {
        let stream = dp::kv_stream(name);
        t.store(format!("key-value bucket {name} ({stream})"))
            .stream_calls(
                &stream,
                [create, "......", "......", "......", info, "......"],
            )
            .call(
                "get a key (DIRECT.GET)",
                format!("{}.$KV.{name}.{NAME}", api("DIRECT.GET", &stream)),
                "",
                get,
            )
            .call(
                "watch or list keys (CONSUMER.CREATE)",
                api("CONSUMER.CREATE", &stream),
                MISNAMED_CONSUMER,
                watch,
            )
            .call(
                "flow control",
                format!("$JS.FC.{stream}.{NAME}.1"),
                "",
                watch,
            );
    };
    bucket(
        &mut t,
        CONFIG_BUCKET,
        "...A..",
        "..OA.D",
        "..OA.D",
        "......",
    );
    t.write(
        "put the settings (key config)",
        format!("$KV.{CONFIG_BUCKET}.config"),
        "..OA..",
    )
    .write(
        "mark the snapshot index built",
        format!("$KV.{CONFIG_BUCKET}.{}", dp::SNAPSHOT_INDEX_BUILT),
        "..OA..",
    )
    .write(
        "put a job's schedule",
        format!("$KV.{CONFIG_BUCKET}.schedule/{job}"),
        "..O...",
    );
    // Unused: the head records live beside the fences.
    bucket(&mut t, HEADS_BUCKET, "......", "......", "......", "......");
    t.write("put a head", format!("$KV.{HEADS_BUCKET}.{job}"), "......");
    bucket(
        &mut t,
        LEASES_BUCKET,
        "...A..",
        "..OA.D",
        "...A..",
        "...A..",
    );
    t.write(
        "put a lease",
        format!("$KV.{LEASES_BUCKET}.{NAME}"),
        "..O...",
    );
    bucket(
        &mut t,
        HEARTBEATS_BUCKET,
        "...A..",
        "..OAMD",
        "..O...",
        "....M.",
    );
    t.write(
        "put its own heartbeat",
        format!("$KV.{HEARTBEATS_BUCKET}.{}", subjects::daemon_key(d1)),
        ".....D",
    )
    .write(
        "put another daemon's heartbeat",
        format!("$KV.{HEARTBEATS_BUCKET}.{}", subjects::daemon_key(d2)),
        "......",
    );
    bucket(
        &mut t,
        FENCES_BUCKET,
        "C.....",
        "C.OA.D",
        "C..A.D",
        "......",
    );
    t.write(
        "raise a fence",
        format!("$KV.{FENCES_BUCKET}.{job}"),
        "C....D",
    )
    .call(
        "get a head record (DIRECT.GET of head.<job>)",
        format!(
            "{}.$KV.{FENCES_BUCKET}.head.{job}",
            api("DIRECT.GET", &dp::kv_stream(FENCES_BUCKET))
        ),
        "",
        "C..A.D",
    )
    .write(
        "put a head record",
        format!("$KV.{FENCES_BUCKET}.head.{job}"),
        "C....D",
    );

    // The command service's own: the answers of old command ids, its model's snapshots.
    let archive = subjects::COMMAND_ARCHIVE_BUCKET;
    bucket(&mut t, archive, "C.....", "C.....", "......", "......");
    t.call(
        "get an answer through the leader (STREAM.MSG.GET)",
        api("STREAM.MSG.GET", &dp::kv_stream(archive)),
        NO_SUCH_MSG,
        "C.....",
    )
    .write(
        "archive a command's answer",
        format!("$KV.{archive}.{NAME}"),
        "C.....",
    );
    let model_bucket = subjects::MODEL_BUCKET;
    let model = dp::object_stream(model_bucket);
    t.store(format!("model snapshots {model_bucket} ({model})"))
        .stream_calls(
            &model,
            ["C.....", "......", "......", "C.....", "C.....", "......"],
        )
        .call(
            "object info (DIRECT.GET of its metadata)",
            format!("{}.$O.{model_bucket}.M.{NAME}", api("DIRECT.GET", &model)),
            "",
            "C.....",
        )
        .call(
            "object read (CONSUMER.CREATE)",
            api("CONSUMER.CREATE", &model),
            MISNAMED_CONSUMER,
            "C.....",
        )
        .write(
            "object put: a chunk",
            format!("$O.{model_bucket}.C.{NAME}"),
            "C.....",
        )
        .write(
            "object put: its metadata",
            format!("$O.{model_bucket}.M.{NAME}"),
            "C.....",
        );

    t.store("commands, queries, progress")
        .call("move-jobs", subjects::command("move-jobs"), "{}", "..O...")
        .call(
            "register-daemon",
            subjects::command("register-daemon"),
            "{}",
            "..O..D",
        )
        .call(
            "resize-oplog-ttl",
            subjects::command("resize-oplog-ttl"),
            "{}",
            "..OA..",
        )
        .call(
            "report-daemon-liveness",
            subjects::command("report-daemon-liveness"),
            "{}",
            "..O.M.",
        )
        .call("a query", subjects::query("status"), "{}", "..O...")
        .call("publish progress", subjects::progress(NAME), "{}", ".....D")
        .call("micro service discovery", "$SRV.PING", "", "CP....");
    t.calls
}

/// A role's connection, and the subjects the server said it may not publish to.
async fn connect_as(
    url: &str,
    seed: &str,
) -> Result<(async_nats::Client, watch::Receiver<HashSet<String>>)> {
    let (tx, rx) = watch::channel(HashSet::new());
    let client = async_nats::ConnectOptions::with_nkey(seed.to_owned())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) = event {
                    if let Some(subject) = e
                        .strip_prefix("Permissions Violation for Publish to \"")
                        .and_then(|s| s.strip_suffix('"'))
                    {
                        tx.send_modify(|denied| {
                            denied.insert(subject.to_owned());
                        });
                    }
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok((client, rx))
}

/// What became of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Denied,
    /// Neither an answer nor a violation: the test cannot tell.
    Unknown(String),
}

/// Makes `call` as `client`: an answer first is allowed, a violation first is denied.
async fn attempt(
    client: &async_nats::Client,
    denied: &watch::Receiver<HashSet<String>>,
    call: &Call,
) -> Outcome {
    let mut request = async_nats::Request::new()
        .payload(call.body.clone().into())
        .timeout(Some(ANSWER_WITHIN));
    if let Some(h) = &call.headers {
        request = request.headers(h.clone());
    }
    let mut denied = denied.clone();
    tokio::select! {
        answer = client.send_request(call.subject.clone(), request) => match answer {
            Ok(_) => Outcome::Allowed,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Outcome::Allowed,
            Err(e) => Outcome::Unknown(e.to_string()),
        },
        // A closed channel means the connection went away: the answer's error says so.
        Ok(_) = denied.wait_for(|d| d.contains(&call.subject)) => Outcome::Denied,
    }
}

/// A nats-server running the generated authorization for these users, and its store.
struct SecuredServer {
    // Dropped first: the process stops before its directory is removed.
    process: NatsProcess,
    _dir: tempfile::TempDir,
}

impl SecuredServer {
    async fn start(users: &[NatsUser], ready_seed: &str) -> Result<Self> {
        let bin = handoff_natsd::find_binary(&[PathBuf::from(env!("CARGO_MANIFEST_DIR"))])?;
        let dir = tempfile::Builder::new()
            .prefix("handoff-permissions-")
            .tempdir()?;
        let security = Security {
            authorization: authorization(users),
            seed: ready_seed.to_owned(),
        };
        let process = NatsProcess::start_secured(bin, dir.path(), None, Some(&security)).await?;
        Ok(SecuredServer { process, _dir: dir })
    }
}

/// Every role tries every call on a server running the generated permissions; the
/// stores exist (the command service and the agent create theirs under these
/// permissions, a daemon binds to them), and each call is allowed or denied exactly as
/// the table says.
#[tokio::test]
async fn each_role_gets_exactly_its_jetstream_calls() -> Result<()> {
    let d1 = DaemonId::new("backup1.example.net:/data/backup/")?;
    let d2 = DaemonId::new("backup2.example.net:/data/backup/")?;
    let job = JobId::new("sales/orders")?;
    let roles = [
        ProcessRole::CommandService,
        ProcessRole::Projector,
        ProcessRole::Operator,
        ProcessRole::Agent,
        ProcessRole::Monitor,
        ProcessRole::Daemon(d1.clone()),
        ProcessRole::Daemon(d2.clone()),
    ];
    let seeds: Vec<String> = roles.iter().map(|_| auth::new_seed()).collect();
    let users: Vec<NatsUser> = roles
        .iter()
        .zip(&seeds)
        .map(|(role, seed)| {
            Ok(NatsUser {
                nkey: auth::public_key_of(seed).map_err(anyhow::Error::msg)?,
                role: role.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let server = SecuredServer::start(&users, &seeds[0]).await?;
    let url = server.process.url();

    // The owners create their stores; the others bind to them.
    let command_service = async_nats::ConnectOptions::with_nkey(seeds[0].clone())
        .connect(&url)
        .await?;
    let log = EventLog::open(command_service, Default::default()).await?;
    Fences::open(log.jetstream(), 1).await?;
    handoff_command::archive::Archive::open(log.jetstream(), 1).await?;
    handoff_command::archive::Snapshots::open(log.jetstream(), 1).await?;
    let agent = async_nats::ConnectOptions::with_nkey(seeds[3].clone())
        .connect(&url)
        .await?;
    Stores::open(agent, 1).await?;
    let daemon = async_nats::ConnectOptions::with_nkey(seeds[5].clone())
        .connect(&url)
        .await?;
    Stores::bind(daemon)
        .await
        .context("a daemon binds to the data plane's stores")?;

    let calls = table(&d1, &d2, &job);
    let mut outcomes: Vec<Vec<Outcome>> = Vec::new();
    let tries = seeds.iter().take(ROLES.len()).map(|seed| {
        let (url, calls) = (&url, &calls);
        async move {
            let (client, denied) = connect_as(url, seed).await?;
            // The client queues the server's errors (the violations) 128 at most and
            // drops the rest: a few calls at a time, so none is lost.
            let each = calls.iter().map(|c| attempt(&client, &denied, c));
            Ok::<_, anyhow::Error>(
                futures::stream::iter(each)
                    .buffered(CALLS_AT_ONCE)
                    .collect::<Vec<_>>()
                    .await,
            )
        }
    });
    for role in futures::future::join_all(tries).await {
        outcomes.push(role?);
    }

    let mut wrong = Vec::new();
    let mut printed = String::from("| call | subject |");
    for r in ROLES {
        printed.push_str(&format!(" {r} |"));
    }
    printed.push_str(&format!("\n|---|---|{}\n", "---|".repeat(ROLES.len())));
    let mut store = "";
    for (i, call) in calls.iter().enumerate() {
        if call.store != store {
            store = &call.store;
            printed.push_str(&format!("| **{store}** | |{}\n", " |".repeat(ROLES.len())));
        }
        printed.push_str(&format!("| {} | `{}` |", call.what, call.subject));
        for (r, role) in ROLES.iter().enumerate() {
            let expected = call.expected.as_bytes()[r] != b'.';
            let cell = match (&outcomes[r][i], expected) {
                (Outcome::Allowed, true) => "✓".to_owned(),
                (Outcome::Denied, false) => "✗".to_owned(),
                (got, _) => {
                    wrong.push(format!(
                        "{role}: {} ({}) expected {}, got {got:?}",
                        call.what,
                        call.subject,
                        if expected { "allowed" } else { "denied" }
                    ));
                    format!("**{got:?}**")
                }
            };
            printed.push_str(&format!(" {cell} |"));
        }
        printed.push('\n');
    }
    println!("{printed}");
    if !wrong.is_empty() {
        bail!(
            "{} calls went otherwise:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
    Ok(())
}
