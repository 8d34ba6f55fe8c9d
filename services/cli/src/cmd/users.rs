//! `handoff user add|list|remove` and `handoff nats-config`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use handoff_domain::auth::Role;
use handoff_domain::command::{AddUser, RemoveUser};
use handoff_domain::{Actor, Command, DaemonId, Event};
use handoff_protocol::auth::Credentials;
use handoff_protocol::permissions::ProcessRole;
use handoff_protocol::subjects;
use serde::Serialize;

use crate::cmd::{command_id, parse_id, print_json};
use crate::secrets::{self, NatsKeys};
use crate::{Context, Failure};

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user (GLOBAL_OWNER only): a new key is made here, only its public half is
    /// sent, and the credentials are written to a file readable by you alone.
    Add {
        name: String,
        /// GLOBAL_OWNER, GLOBAL_BACKUP_ADMIN, GLOBAL_READ_ONLY, BACKUP_DAEMON or
        /// BACKUP_AGENT (repeat for several).
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
        /// For BACKUP_DAEMON: the daemon it runs as.
        #[arg(long)]
        daemon: Option<String>,
        /// Where to write the credentials [default: ./NAME.creds]. Never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The NATS key the user's process connects with (a seed file from
        /// `handoff nats-config`) [default: your own NATS identity].
        #[arg(long)]
        nats_key: Option<PathBuf>,
    },
    /// List current users, their roles and public keys.
    List,
    /// Remove a user (GLOBAL_OWNER only): its key signs nothing any more.
    Remove { name: String },
}

#[derive(Debug, Args)]
pub struct NatsConfigArgs {
    /// Directory for auth.conf, one NATS key per process role and the owner's credentials.
    #[arg(long)]
    pub out: PathBuf,
    /// A daemon that will run (repeat): each gets a NATS identity of its own.
    #[arg(long = "daemon")]
    pub daemons: Vec<String>,
    /// The first owner's name.
    #[arg(long, default_value = "admin")]
    pub owner: String,
}

/// A user as `user list` shows it.
#[derive(Debug, Serialize)]
struct UserRow {
    user: Actor,
    roles: Vec<Role>,
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon: Option<DaemonId>,
    added_by: Actor,
    added_at: u64,
}

pub async fn user(ctx: &Context, c: UserCmd) -> Result<(), Failure> {
    match c {
        UserCmd::Add {
            name,
            roles,
            daemon,
            out,
            nats_key,
        } => {
            let user = parse_id("user", &name, Actor::new)?;
            let daemon = daemon
                .map(|d| parse_id("--daemon", &d, DaemonId::new))
                .transpose()?;
            let nats_seed = match nats_key {
                Some(p) => Some(secrets::read_seed(&p)?),
                None => ctx.nats_seed.clone(),
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.creds")));
            if out.exists() {
                return Err(Failure::Usage(format!(
                    "{} exists; choose another --out (credentials are never overwritten)",
                    out.display()
                )));
            }
            let creds = Credentials::generate(user.clone(), nats_seed);
            let api = ctx.api().await?;
            let command = Command::AddUser(AddUser {
                user: user.clone(),
                roles: roles.clone(),
                key: creds.public_key(),
                daemon,
            });
            let applied = api.command(&command_id(None)?, &command).await?;
            creds.write_new(&out).map_err(|e| {
                Failure::Usage(format!(
                    "{e} (the user was added; remove it and add it again)"
                ))
            })?;
            if ctx.json {
                print_json(&applied);
            } else {
                let roles: Vec<_> = roles.iter().map(|r| r.as_str()).collect();
                println!("added {user} ({})", roles.join(", "));
                println!("  key          {}", creds.public_key());
                println!(
                    "  credentials  {} (mode 600; keep it secret)",
                    out.display()
                );
                println!("  use it with  export HANDOFF_CREDS={}", out.display());
            }
            Ok(())
        }
        UserCmd::List => {
            let rows = list(ctx).await?;
            if ctx.json {
                print_json(&rows);
                return Ok(());
            }
            println!("{:<24} {:<40} {:<36} KEY", "USER", "ROLES", "DAEMON");
            for r in rows {
                let roles: Vec<_> = r.roles.iter().map(|r| r.as_str()).collect();
                println!(
                    "{:<24} {:<40} {:<36} {}",
                    r.user,
                    roles.join(","),
                    r.daemon
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| "-".into()),
                    r.key
                );
            }
            Ok(())
        }
        UserCmd::Remove { name } => {
            let user = parse_id("user", &name, Actor::new)?;
            let api = ctx.api().await?;
            let applied = api
                .command(
                    &command_id(None)?,
                    &Command::RemoveUser(RemoveUser { user: user.clone() }),
                )
                .await?;
            if ctx.json {
                print_json(&applied);
            } else {
                println!("removed {user}");
            }
            Ok(())
        }
    }
}

/// The current users, folded from their subjects of the event stream.
async fn list(ctx: &Context) -> Result<Vec<UserRow>, Failure> {
    let api = ctx.api().await?;
    let log = api.log().await?;
    let mut users: std::collections::BTreeMap<Actor, UserRow> = Default::default();
    for r in log.events_of(subjects::USERS).await? {
        match r.envelope.event {
            Event::UserAdded {
                user,
                roles,
                key,
                daemon,
            } => {
                users.insert(
                    user.clone(),
                    UserRow {
                        user,
                        roles: roles.into_iter().collect(),
                        key: key.to_string(),
                        daemon,
                        added_by: r.envelope.actor,
                        added_at: r.envelope.at,
                    },
                );
            }
            Event::UserRemoved { user } => {
                users.remove(&user);
            }
            _ => {}
        }
    }
    Ok(users.into_values().collect())
}

pub fn nats_config(ctx: &Context, a: NatsConfigArgs) -> Result<(), Failure> {
    let daemons = a
        .daemons
        .iter()
        .map(|d| parse_id("--daemon", d, DaemonId::new))
        .collect::<Result<Vec<_>, _>>()?;
    let owner = parse_id("--owner", &a.owner, Actor::new)?;
    let keys = NatsKeys::load_or_create(&a.out, &daemons)?;
    let conf = a.out.join("auth.conf");
    std::fs::write(&conf, keys.security().authorization)?;
    let creds = secrets::creds_file(
        &a.out.join(format!("{owner}.creds")),
        &owner,
        Some(keys.operator.clone()),
    )?;
    let first_owner = format!("{owner}={}", creds.public_key());
    if ctx.json {
        print_json(&serde_json::json!({
            "authorization": conf,
            "first_owner": first_owner,
            "owner_creds": a.out.join(format!("{owner}.creds")),
        }));
        return Ok(());
    }
    println!(
        "wrote {} (include it in the nats-server configuration)",
        conf.display()
    );
    for role in [
        ProcessRole::CommandService,
        ProcessRole::Projector,
        ProcessRole::Operator,
        ProcessRole::Agent,
        ProcessRole::Monitor,
    ]
    .into_iter()
    .chain(daemons.into_iter().map(ProcessRole::Daemon))
    {
        println!(
            "  NATS key of {:<16} {}",
            role.name(),
            secrets::key_path(&a.out, &role).display()
        );
    }
    println!(
        "first owner's credentials {}",
        a.out.join(format!("{owner}.creds")).display()
    );
    println!("start the command service with --first-owner {first_owner}");
    Ok(())
}
