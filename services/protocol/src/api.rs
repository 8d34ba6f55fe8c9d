//! Requests and replies of the command service, and their error codes.
//!
//! A request to `handoff.cmd.<endpoint>` is
//! `{"id": ULID, "actor": NAME, "at": MS, "client": TEXT?, "command": {..}}` where `command`
//! is the endpoint's command body, signed by the actor (see [`crate::auth`]). The reply is
//! either `{"ok": Applied}` or `{"error": ErrorBody}`.

use handoff_domain::{
    command::*, Command, CommandId, DaemonId, JobId, MovePlan, Rejection, RejectionClass,
};
use serde::{Deserialize, Serialize};

/// Requests larger than this are refused before they are parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A command as sent to its endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest<C> {
    /// Chosen by the caller; resending the same id is safe and changes nothing.
    pub id: CommandId,
    /// The user who signed the request.
    pub actor: handoff_domain::Actor,
    /// When it was signed, in milliseconds since the Unix epoch: requests older (or
    /// newer) than the service's freshness window are refused.
    pub at: u64,
    /// What the client says it is (program and host), for the audit trail. At most
    /// [`MAX_CLIENT`] characters, no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub command: C,
}

/// The longest `client` a request may carry.
pub const MAX_CLIENT: usize = 128;

/// One endpoint of the command service.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    /// The last token of its subject.
    pub name: &'static str,
    /// Parses a request body into a command request.
    pub parse: fn(&[u8]) -> Result<CommandRequest<Command>, serde_json::Error>,
}

macro_rules! endpoints {
    ($($name:literal => $variant:ident),* $(,)?) => {
        /// Every command endpoint.
        pub const ENDPOINTS: &[Endpoint] = &[
            $(Endpoint {
                name: $name,
                parse: |bytes| {
                    let r: CommandRequest<$variant> = serde_json::from_slice(bytes)?;
                    Ok(CommandRequest { id: r.id, actor: r.actor, at: r.at, client: r.client, command: Command::$variant(r.command) })
                },
            }),*
        ];

        /// The JSON Schema of each endpoint's request, by endpoint name.
        pub fn request_schemas() -> Vec<(&'static str, schemars::Schema)> {
            vec![$(($name, schemars::schema_for!(CommandRequest<$variant>))),*]
        }

        /// The endpoint of a command.
        pub fn endpoint_of(command: &Command) -> &'static str {
            match command {
                $(Command::$variant(_) => $name),*
            }
        }
    };
}

endpoints! {
    "register-daemon" => RegisterDaemon,
    "configure-daemon" => ConfigureDaemon,
    "remove-daemon" => RemoveDaemon,
    "report-daemon-liveness" => ReportDaemonLiveness,
    "configure-project" => ConfigureProject,
    "create-backup-jobs" => CreateBackupJobs,
    "move-jobs" => MoveJobs,
    "move-job" => MoveJob,
    "spread-jobs" => SpreadJobs,
    "report-job-move-phase" => ReportJobMovePhase,
    "complete-job-move" => CompleteJobMove,
    "fail-job-move" => FailJobMove,
    "cancel-move" => CancelMove,
    "drain-daemon" => DrainDaemon,
    "continue-drain" => ContinueDrain,
    "cancel-drain" => CancelDrain,
    "resize-oplog-ttl" => ResizeOplogTtl,
    "add-user" => AddUser,
    "remove-user" => RemoveUser,
    "report-head-space" => ReportHeadSpace,
    "report-move-stuck" => ReportMoveStuck,
    "report-failover-guard" => ReportFailoverGuard,
    "failover-job" => FailoverJob,
}

/// Serializes a request for the command's endpoint, dated now (unsigned: see
/// [`crate::auth::Credentials::sign_command`]).
pub fn encode_request(id: &CommandId, actor: &handoff_domain::Actor, command: &Command) -> Vec<u8> {
    encode_request_at(id, actor, crate::auth::now_ms(), None, command)
}

/// Serializes a request for the command's endpoint, dated `at_ms`.
pub fn encode_request_at(
    id: &CommandId,
    actor: &handoff_domain::Actor,
    at_ms: u64,
    client: Option<&str>,
    command: &Command,
) -> Vec<u8> {
    let body = serde_json::to_value(command).expect("commands always serialize");
    // The tagged form carries "type"; the endpoint already says which command it is.
    let mut body = body;
    if let Some(map) = body.as_object_mut() {
        map.remove("type");
    }
    let mut request = serde_json::json!({ "id": id, "actor": actor, "at": at_ms, "command": body });
    if let Some(c) = client {
        request["client"] = c.into();
    }
    serde_json::to_vec(&request).expect("json values always serialize")
}

/// An event appended by a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AppendedEvent {
    pub seq: u64,
    pub subject: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// A command that was applied (or, for a dry run, planned).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Applied {
    pub command: CommandId,
    /// The events the command appended, in stream order. Empty for a dry run or a
    /// command that changed nothing (e.g. reporting a liveness the daemon already has).
    pub events: Vec<AppendedEvent>,
    /// True when this id was already applied: nothing was appended this time, and
    /// `events` lists what the first time appended.
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// A move's plan: its jobs, the checks passed and the head space before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<MovePlan>,
}

/// The families of error, stable on the wire. How to react is in each variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request: fix it. Retrying as is gives the same answer.
    Validation,
    /// An id names nothing.
    NotFound,
    /// The state changed under the command, or another command holds the job.
    Conflict,
    /// The fleet cannot take the work (a check of rule 3, a bind failure).
    Refused,
    /// The caller may not do this.
    Forbidden,
    /// The event log could not be reached in time: retry with the same id.
    Unavailable,
    /// A bug: report it. Retrying with the same id is safe.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "validation",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Refused => "refused",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The NATS micro service status for the code (HTTP-like).
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Validation => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Refused => 422,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// Why a command was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// A finer, stable reason (e.g. `assignment_disabled`, `malformed`, `too_large`): the list is in schemas/README.md.
    pub reason: String,
    /// For people: lower case, says what and why.
    pub message: String,
    /// The domain rejection, when there is one, with its fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Box<Rejection>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            message: message.into(),
            rejection: None,
        }
    }
}

impl From<Rejection> for ErrorBody {
    fn from(r: Rejection) -> Self {
        let code = match r.class() {
            RejectionClass::Validation => ErrorCode::Validation,
            RejectionClass::NotFound => ErrorCode::NotFound,
            RejectionClass::Conflict => ErrorCode::Conflict,
            RejectionClass::Refused => ErrorCode::Refused,
        };
        ErrorBody {
            code,
            reason: r.reason_code().to_owned(),
            message: r.to_string(),
            rejection: Some(Box::new(r)),
        }
    }
}

/// The reply to every command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Applied),
    Error(ErrorBody),
}

impl Reply {
    pub fn into_result(self) -> Result<Applied, ErrorBody> {
        match self {
            Reply::Ok(a) => Ok(a),
            Reply::Error(e) => Err(e),
        }
    }
}

/// Queries answered by the projector from its views.
///
/// Every list query is paged: `limit` items at most (default [`DEFAULT_LIMIT`], at most
/// [`MAX_LIMIT`]), fewer when the page would not fit the server's payload limit; `next`
/// is the opaque cursor of the following page (absent on the last), `total` how many
/// items the whole list holds. A page costs what it holds, not the size of the fleet.
pub mod query {
    use super::*;
    use handoff_domain::alert::AlertKind;

    /// Every query endpoint (the last token of `handoff.query.<query>`).
    pub const QUERIES: &[&str] = &[
        "status",
        "daemons",
        "daemon",
        "assignments",
        "projects",
        "jobs",
        "job",
        "moves",
        "move",
        "history",
        "alerts",
    ];

    /// Items per page when a query does not say.
    pub const DEFAULT_LIMIT: u32 = 100;
    /// The most items a page may ask for.
    pub const MAX_LIMIT: u32 = 1000;

    /// `handoff.query.job`: one job's view.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ByJob {
        pub job: JobId,
    }

    /// `handoff.query.daemon`: one daemon's view.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ByDaemon {
        pub daemon: DaemonId,
    }

    /// `handoff.query.assignments`: the jobs a daemon owns, by job id.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Assignments {
        pub daemon: DaemonId,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// `handoff.query.move`.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ByMove {
        pub move_id: CommandId,
    }

    /// `handoff.query.daemons`: daemon views by id; `status` keeps those `up`, `down`
    /// or `removed`.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Daemons {
        #[serde(default)]
        pub status: Option<DaemonFilter>,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// A daemon's standing, for [`Daemons`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum DaemonFilter {
        Up,
        Down,
        Removed,
    }

    /// `handoff.query.projects`: project views by id.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Projects {
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// `handoff.query.jobs`: job views by id, filtered; every filter is optional. `daemon`
    /// keeps the jobs it owns and those moving away from it.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Jobs {
        #[serde(default)]
        pub daemon: Option<DaemonId>,
        #[serde(default)]
        pub project: Option<handoff_domain::ProjectId>,
        #[serde(default)]
        pub moving: Option<bool>,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// `handoff.query.moves`: move views, newest first; `status` keeps one standing.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Moves {
        #[serde(default)]
        pub status: Option<crate::views::MoveStatus>,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// `handoff.query.status`'s request: `{}` or an empty body.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Empty {}

    /// `handoff.query.alerts`: open alerts, or every alert's last state with `all`;
    /// newest first; `type` keeps one kind.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Alerts {
        #[serde(default)]
        pub all: bool,
        #[serde(default, rename = "type")]
        pub kind: Option<AlertKind>,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }

    /// `handoff.query.status`.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    pub struct Status {
        /// The last stream sequence folded into the views.
        pub checkpoint: u64,
    }

    /// The reply to every query.
    #[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum QueryReply<T> {
        Ok(T),
        Error(ErrorBody),
    }

    /// One page of a list.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    pub struct Page<T> {
        pub items: Vec<T>,
        /// Items in the whole list (every page), as of this page.
        pub total: u64,
        /// The cursor of the next page; absent on the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next: Option<String>,
    }

    /// `handoff.query.history`: events of one job or daemon, oldest first.
    #[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct History {
        #[serde(default)]
        pub job: Option<JobId>,
        #[serde(default)]
        pub daemon: Option<DaemonId>,
        #[serde(default)]
        pub limit: Option<u32>,
        #[serde(default)]
        pub cursor: Option<String>,
    }
}
