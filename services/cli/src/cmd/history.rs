//! `history` (the audit replay, read from the event stream itself, not from any view)
//! and `watch` (events as they happen).

use clap::Args;
use handoff_domain::model::MoveScope;
use handoff_domain::{DaemonId, Event, JobId};
use handoff_eventlog::{Follower, Recorded};
use serde_json::json;

use super::fleet::{daemon_id, job_id};
use crate::output::{bytes, parse_since, time};
use crate::{Context, Failure};

/// How long a reader waits for the event stream to come back before it gives up: a node
/// lost in a cluster takes a few seconds to be replaced as a stream's leader.
const OUTAGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Which events to show.
#[derive(Debug, Args)]
pub struct Filter {
    /// Only events about this job.
    #[arg(long, value_parser = job_id)]
    pub job: Option<JobId>,
    /// Only events about this daemon itself (registration, liveness, drains, head
    /// space, assignments, failovers, moves from or to it); each job's creation and move
    /// steps are in the job's history.
    #[arg(long, value_parser = daemon_id)]
    pub daemon: Option<DaemonId>,
}

impl Filter {
    fn matches(&self, e: &Event) -> bool {
        self.job.as_ref().is_none_or(|j| e.jobs().contains(&j))
            && self
                .daemon
                .as_ref()
                .is_none_or(|d| e.daemons().contains(&d))
    }
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub filter: Filter,
    /// Only events from this time on: RFC 3339, or an age like 30m, 2h, 7d.
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub filter: Filter,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<usize>,
}

pub async fn history(ctx: &Context, a: HistoryArgs) -> Result<(), Failure> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let since = a
        .since
        .as_deref()
        .map(|s| parse_since(s, now))
        .transpose()
        .map_err(|e| Failure::Usage(format!("--since: {e}")))?;
    let api = ctx.api().await?;
    let log = api.log().await?;
    let end = log.last_sequence_within(OUTAGE).await?;
    if end == 0 {
        return Ok(());
    }
    let mut reader = Follower::new(log, 1, None);
    loop {
        let r = reader.next().await?;
        if a.filter.matches(&r.envelope.event) && since.is_none_or(|s| r.envelope.at >= s) {
            print_event(ctx, &r);
        }
        if r.seq >= end {
            return Ok(());
        }
    }
}

pub async fn watch(ctx: &Context, a: WatchArgs) -> Result<(), Failure> {
    let api = ctx.api().await?;
    let log = api.log().await?;
    let end = log.last_sequence_within(OUTAGE).await?;
    let mut reader = Follower::new(log, end + 1, None);
    if !ctx.json {
        eprintln!("watching events after #{end} (Ctrl-C to stop)");
    }
    let mut shown = 0;
    while a.limit.is_none_or(|l| shown < l) {
        let r = tokio::select! {
            r = reader.next() => r?,
            _ = crate::shutdown_signal() => return Ok(()),
        };
        if a.filter.matches(&r.envelope.event) {
            print_event(ctx, &r);
            shown += 1;
        }
    }
    Ok(())
}

fn print_event(ctx: &Context, r: &Recorded) {
    if ctx.json {
        let mut v = serde_json::to_value(&r.envelope).expect("envelopes serialize");
        v["seq"] = json!(r.seq);
        v["subject"] = json!(r.subject);
        println!("{v}");
    } else {
        println!(
            "{}  #{:<6} {:<12} {:<22} {}",
            time(r.envelope.at),
            r.seq,
            r.envelope.actor,
            r.envelope.event.type_name(),
            describe(&r.envelope.event)
        );
    }
}

/// One line for people about an event.
pub fn describe(e: &Event) -> String {
    match e {
        Event::DaemonRegistered { daemon, settings } => format!(
            "{daemon} registered: {} {} head space, assignment {}",
            bytes(settings.head_space_bytes),
            crate::output::name(&settings.head_disk_type),
            if settings.assignment_enabled {
                "enabled"
            } else {
                "disabled"
            }
        ),
        Event::DaemonConfigured { daemon, settings } => format!(
            "{daemon} configured: {} head space, assignment {}",
            bytes(settings.head_space_bytes),
            if settings.assignment_enabled {
                "enabled"
            } else {
                "disabled"
            }
        ),
        Event::DaemonRemoved { daemon } => format!("{daemon} removed"),
        Event::DaemonDown { daemon } => format!("{daemon} is down (DAEMON_DOWN)"),
        Event::DaemonUp { daemon } => format!("{daemon} is up (DAEMON_UP)"),
        Event::ProjectConfigured {
            project,
            daemon_filter,
            label_filter,
        } => format!(
            "project {project} configured: {} daemon(s) in its filter, labels {:?}",
            daemon_filter.len(),
            label_filter.iter().map(|l| l.as_str()).collect::<Vec<_>>()
        ),
        Event::BackupJobCreated {
            job, daemon, size, ..
        } => format!(
            "job {job} created on {daemon} ({} head)",
            bytes(size.head_size_bytes)
        ),
        Event::JobsAssigned {
            daemon,
            cause,
            jobs,
        } => format!(
            "{daemon} assigned {} job(s) ({})",
            jobs.len(),
            match cause {
                handoff_domain::event::AssignmentCause::Placement => "new".to_owned(),
                handoff_domain::event::AssignmentCause::Move { move_id } =>
                    format!("move {move_id}"),
                handoff_domain::event::AssignmentCause::MoveFailed { move_id } =>
                    format!("move {move_id} failed, returned"),
            }
        ),
        Event::MoveStarted {
            move_id,
            scope,
            from,
            to,
            reason,
            jobs,
            automatic,
            spread,
            drain,
        } => format!(
            "{}move {move_id} of {} from {from} to {}: {jobs} job(s){}{}",
            if *automatic { "automatic " } else { "" },
            match scope {
                MoveScope::AllJobsOf { .. } => "all jobs".to_owned(),
                MoveScope::OneJob { job } => format!("job {job}"),
            },
            match spread {
                None => to.to_string(),
                Some(over) if over.is_empty() => "any eligible daemon (spread)".to_owned(),
                Some(over) => format!("{} daemon(s) (spread)", over.len()),
            },
            drain
                .as_ref()
                .map(|d| format!(" (drain {d})"))
                .unwrap_or_default(),
            reason
                .as_deref()
                .map(|r| format!(", reason: {r}"))
                .unwrap_or_default()
        ),
        Event::JobMoveStarted {
            job,
            from,
            to,
            epoch,
            reason,
            ..
        } => format!(
            "job {job} moving from {from} to {to} (epoch {epoch}){}",
            reason
                .as_deref()
                .map(|r| format!(", reason: {r}"))
                .unwrap_or_default()
        ),
        Event::JobMovePhaseReported { job, phase, .. } => {
            format!("job {job}: {}", crate::output::name(&phase))
        }
        Event::MoveInterrupted {
            move_id,
            planned,
            started,
            reason,
        } => format!(
            "move {move_id} interrupted: {started} of {planned} jobs started, the rest waits \
             ({reason}) (MOVE_INTERRUPTED)"
        ),
        Event::MoveResumed { move_id, started } => {
            format!("move {move_id} resumed: all of its {started} jobs started")
        }
        Event::JobMoveCompleted {
            job,
            daemon,
            epoch,
            head,
            ..
        } => match head {
            Some(h) => format!(
                "job {job} now on {daemon} (epoch {epoch}), head at {} checksum {}",
                h.ts, h.checksum
            ),
            None => format!("job {job} now on {daemon} (epoch {epoch})"),
        },
        Event::JobsReleased {
            daemon,
            move_id,
            jobs,
        } => format!("{daemon} releases {} job(s) to move {move_id}", jobs.len()),
        Event::OplogTtlResized {
            job,
            previous_hours,
            hours,
            reason,
        } => format!(
            "job {job} oplog retention {previous_hours} h -> {hours} h (OPLOG_TTL_RESIZE): {reason}"
        ),
        Event::UserAdded {
            user,
            roles,
            daemon,
            key,
        } => {
            let roles: Vec<_> = roles.iter().map(|r| r.as_str()).collect();
            let bound = daemon
                .as_ref()
                .map(|d| format!(" as daemon {d}"))
                .unwrap_or_default();
            format!("user {user} added ({}){bound}, key {key}", roles.join(", "))
        }
        Event::UserRemoved { user } => format!("user {user} removed"),
        Event::CommandRefused {
            user,
            command,
            command_id,
            reason,
            message,
            client,
            ..
        } => format!(
            "refused {command} {command_id} claimed by {user} from {}: {reason}: {message}",
            client.as_deref().unwrap_or("an unnamed client")
        ),
        Event::CommandAccepted { command_id } => {
            format!("command {command_id} accepted: its events are appended with this")
        }
        Event::CommandRejected {
            command_id,
            command,
            rejection,
        } => format!(
            "{command} {command_id} rejected ({}): {rejection}; every later attempt of the id gets this answer",
            rejection.reason_code()
        ),
        Event::JobMoveFailed {
            job,
            reason,
            returned_to,
            epoch,
            cancelled: true,
            ..
        } => format!(
            "job {job} move cancelled: {reason}; back on {returned_to} (epoch {epoch})"
        ),
        Event::JobMoveFailed {
            job,
            reason,
            returned_to,
            epoch,
            ..
        } => format!(
            "job {job} move failed (THEFT_FAILED): {reason}; back on {returned_to} (epoch {epoch})"
        ),
        Event::MoveCancelled {
            move_id,
            reason,
            cancelled,
            ..
        } => format!("move {move_id} cancelled: {reason}; {cancelled} job(s) sent back"),
        Event::DrainStarted {
            daemon,
            drain_id,
            max_concurrent,
            reason,
            jobs,
        } => format!(
            "drain {drain_id} of {daemon} started: assignment disabled, {jobs} job(s) to move, at most {max_concurrent} at a time{}",
            reason
                .as_deref()
                .map(|r| format!(", reason: {r}"))
                .unwrap_or_default()
        ),
        Event::DrainCompleted {
            daemon,
            drain_id,
            moved,
            left,
        } => format!(
            "drain {drain_id} of {daemon} completed: {moved} job(s) moved{}",
            if *left > 0 {
                format!(", {left} left (their move failed or was cancelled)")
            } else {
                String::new()
            }
        ),
        Event::DrainCancelled {
            daemon,
            drain_id,
            reason,
            moved,
            waiting,
            ..
        } => format!(
            "drain {drain_id} of {daemon} cancelled: {reason}; {moved} job(s) moved, {waiting} not started"
        ),
        Event::DrainBlocked {
            daemon,
            drain_id,
            job,
            detail,
        } => format!(
            "drain {drain_id} of {daemon} blocked (BIND_FAILURE): cannot place {job} nor any job after it: {detail}"
        ),
        Event::HeadSpaceLow {
            daemon,
            free_bytes,
            head_space_bytes,
            threshold_percent,
        } => format!(
            "{daemon} has {} of {} head space free, under {threshold_percent}% (LOW_HEAD_FREE_SPACE)",
            bytes(*free_bytes),
            bytes(*head_space_bytes)
        ),
        Event::HeadSpaceRecovered {
            daemon, free_bytes, ..
        } => format!("{daemon} has {} head space free again", bytes(*free_bytes)),
        Event::BindFailed { job, detail, .. } => {
            format!("job {job} cannot be placed on any daemon (BIND_FAILURE): {detail}")
        }
        Event::MoveStuck {
            job,
            move_id,
            phase,
            idle_ms,
        } => format!(
            "job {job} in move {move_id} shows no progress in {} for {} s (MOVE_STUCK)",
            crate::output::name(phase),
            idle_ms / 1000
        ),
        Event::FailoverPaused {
            down,
            active,
            max_down_percent,
        } => format!(
            "automatic failover paused: {} of {active} daemons down, more than {max_down_percent}%",
            down.len()
        ),
        Event::FailoverResumed { down, active } => format!(
            "automatic failover resumed: {} of {active} daemons down",
            down.len()
        ),
        Event::FailoverDecided {
            job,
            from,
            to,
            inputs,
            ..
        } => format!(
            "failover policy moves job {job} from {from} (down {} s) to {to}, the best of {} candidate(s) ({} free, {} rebuilding)",
            inputs.down_for_ms / 1000,
            inputs.candidates.len(),
            inputs
                .candidates
                .first()
                .map(|c| bytes(c.free_bytes))
                .unwrap_or_default(),
            inputs.candidates.first().map(|c| c.rebuilding).unwrap_or(0)
        ),
    }
}
