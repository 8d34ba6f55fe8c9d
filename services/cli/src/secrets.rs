//! Secrets on disk: NATS keys (one seed per file) and users' credentials, each written
//! 0600 in a 0700 directory, read back on the next start so the same keys stay valid;
//! and the nats-server authorization built from them. Seeds are never printed or logged.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use handoff_domain::{Actor, DaemonId};
use handoff_natsd::Security;
use handoff_protocol::auth::{self, Credentials};
use handoff_protocol::permissions::{authorization, NatsUser, ProcessRole};

use crate::Failure;

/// Creates `dir` readable by its owner only (an existing one is left as is).
pub fn private_dir(dir: &Path) -> Result<(), Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", dir.display())))
}

/// Reads a seed file (one nkeys seed), refusing one that others may read.
pub fn read_seed(path: &Path) -> Result<String, Failure> {
    let fail = |e: String| Failure::Usage(format!("NATS key {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "may be read by others (mode {mode:o}); run `chmod 600 {}`",
            path.display()
        )));
    }
    let seed = std::fs::read_to_string(path)
        .map_err(|e| fail(e.to_string()))?
        .trim()
        .to_owned();
    auth::public_key_of(&seed).map_err(fail)?;
    Ok(seed)
}

/// Writes `seed` to a new file, 0600.
fn write_seed(path: &Path, seed: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(format!("{seed}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The seed in `path`, created there first if there is none.
pub fn seed_file(path: &Path) -> Result<String, Failure> {
    if path.exists() {
        return read_seed(path);
    }
    let seed = auth::new_seed();
    write_seed(path, &seed)?;
    Ok(seed)
}

/// The credentials in `path`, created there for `user` first if there are none.
pub fn creds_file(
    path: &Path,
    user: &Actor,
    nats_seed: Option<String>,
) -> Result<Credentials, Failure> {
    if path.exists() {
        let c = Credentials::load(path).map_err(|e| Failure::Usage(e.to_string()))?;
        if &c.user != user {
            return Err(Failure::Usage(format!(
                "{} holds the credentials of {}, not {user}",
                path.display(),
                c.user
            )));
        }
        return Ok(c);
    }
    let c = Credentials::generate(user.clone(), nats_seed);
    c.write_new(path)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    Ok(c)
}

/// The NATS identity of every process of a deployment.
pub struct NatsKeys {
    pub dir: PathBuf,
    pub command_service: String,
    pub projector: String,
    pub operator: String,
    pub agent: String,
    pub monitor: String,
    pub daemons: Vec<(DaemonId, String)>,
}

/// The file of a role's NATS seed in `dir`.
pub fn key_path(dir: &Path, role: &ProcessRole) -> PathBuf {
    dir.join(format!("{}.nk", role.name()))
}

impl NatsKeys {
    /// Reads the keys in `dir`, creating the missing ones.
    pub fn load_or_create(dir: &Path, daemons: &[DaemonId]) -> Result<Self, Failure> {
        private_dir(dir)?;
        let seed = |role: ProcessRole| seed_file(&key_path(dir, &role));
        Ok(NatsKeys {
            dir: dir.to_owned(),
            command_service: seed(ProcessRole::CommandService)?,
            projector: seed(ProcessRole::Projector)?,
            operator: seed(ProcessRole::Operator)?,
            agent: seed(ProcessRole::Agent)?,
            monitor: seed(ProcessRole::Monitor)?,
            daemons: daemons
                .iter()
                .map(|d| Ok((d.clone(), seed(ProcessRole::Daemon(d.clone()))?)))
                .collect::<Result<_, Failure>>()?,
        })
    }

    /// The users of the server's authorization block.
    pub fn users(&self) -> Vec<NatsUser> {
        let user = |seed: &str, role| NatsUser {
            nkey: auth::public_key_of(seed).expect("seeds were checked when read"),
            role,
        };
        let mut users = vec![
            user(&self.command_service, ProcessRole::CommandService),
            user(&self.projector, ProcessRole::Projector),
            user(&self.operator, ProcessRole::Operator),
            user(&self.agent, ProcessRole::Agent),
            user(&self.monitor, ProcessRole::Monitor),
        ];
        for (d, seed) in &self.daemons {
            users.push(user(seed, ProcessRole::Daemon(d.clone())));
        }
        users
    }

    /// The configuration that makes a server admit these processes only.
    pub fn security(&self) -> Security {
        Security {
            authorization: authorization(&self.users()),
            seed: self.command_service.clone(),
        }
    }

    /// A daemon's NATS seed.
    pub fn daemon(&self, id: &DaemonId) -> Option<&str> {
        self.daemons
            .iter()
            .find(|(d, _)| d == id)
            .map(|(_, s)| s.as_str())
    }
}
