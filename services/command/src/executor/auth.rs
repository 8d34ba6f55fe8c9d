//! Who signed a request, and the record of a refused one.

use super::*;

impl Executor {
    /// Checks who signed `request`: a current user, whose key verifies the signature over
    /// the exact bytes received, signed within `freshness` of now, never seen before, and
    /// holding a role that may send the command. Returns the signature's fingerprint. A
    /// refusal has code `forbidden` and one of the reasons `unsigned`, `unknown_user`,
    /// `bad_signature`, `expired`, `replayed` or `forbidden`; a new id made too far ahead
    /// is `validation`, `id_in_the_future` ([`Executor::refuse_id_ahead`]).
    pub async fn authenticate(
        &mut self,
        request: &CommandRequest<Command>,
        signed: &Signed<'_>,
        freshness: Duration,
    ) -> Result<String, ErrorBody> {
        if signed.signature.is_none() {
            return Err(refused(
                "unsigned",
                format!(
                    "the request carries no {} header: every command is signed with its user's key (handoff signs with --creds)",
                    handoff_protocol::auth::SIGNATURE_HEADER
                ),
            ));
        }
        // Who may do what is read at the stream's end, not on a model that may lag what
        // another instance appended (a user removed, a move finished): a change stored
        // before the request arrived is always seen.
        self.catch_up_with_stream().await?;
        let fingerprint = self.check_signature(request, signed, freshness)?;
        // Before it is remembered: the same request again is refused alike, not as a
        // replay.
        self.refuse_id_ahead(request)?;
        // Received, whatever the role allows: the same signed bytes again are a replay.
        self.remember(&fingerprint, request.at, freshness);
        self.check_role(request)?;
        Ok(fingerprint)
    }

    /// [`Executor::authenticate`]'s first checks on the model as it is: the signer's key,
    /// the signature, its age, a replay. Returns the signature's fingerprint, not yet
    /// remembered.
    pub(super) fn check_signature(
        &self,
        request: &CommandRequest<Command>,
        signed: &Signed<'_>,
        freshness: Duration,
    ) -> Result<String, ErrorBody> {
        let Some(signature) = signed.signature else {
            return Err(refused(
                "unsigned",
                "the request carries no signature".into(),
            ));
        };
        let actor = &request.actor;
        let key = self.user_key(actor).ok_or_else(|| {
            refused(
                "unknown_user",
                format!(
                    "there is no user {actor}: a GLOBAL_OWNER adds users with `handoff user add`"
                ),
            )
        })?;
        if let Err(e) =
            handoff_protocol::auth::verify(&key, signed.subject, signed.payload, signature)
        {
            return Err(refused(
                "bad_signature",
                format!("{e}: the request was altered or not signed by {actor}'s key"),
            ));
        }
        let now = now_ms();
        let window = freshness.as_millis() as u64;
        if request.at.saturating_add(window) < now {
            return Err(refused(
                "expired",
                format!(
                    "the request was signed {} s ago; a signature lasts {} s: sign it again (same id)",
                    (now - request.at) / 1000,
                    window / 1000
                ),
            ));
        }
        if request.at > now.saturating_add(window) {
            return Err(refused(
                "expired",
                format!(
                    "the request is dated {} s in the future, more than the {} s allowed: check the client's clock",
                    (request.at - now) / 1000,
                    window / 1000
                ),
            ));
        }
        let fingerprint = handoff_protocol::auth::fingerprint(signature);
        let applied_before = self
            .model
            .command(&request.id)
            .is_some_and(|r| r.signatures.contains(&fingerprint));
        if applied_before || self.seen.contains_key(&fingerprint) {
            return Err(refused(
                "replayed",
                format!(
                    "this signed request of command {} was received before; a retry is signed again (same id, new time)",
                    request.id
                ),
            ));
        }
        Ok(fingerprint)
    }

    /// [`Executor::authenticate`]'s last check on the model as it is: the signer's roles
    /// allow the command.
    pub(super) fn check_role(&self, request: &CommandRequest<Command>) -> Result<(), ErrorBody> {
        let actor = &request.actor;
        let who = Principal::of(&self.model.state, actor)
            .ok_or_else(|| refused("unknown_user", format!("there is no user {actor} any more")))?;
        authorize(&who, &request.command, &self.model.state)
            .map_err(|f| refused("forbidden", f.to_string()))
    }

    /// Remembers a signature received, so the same signed request is refused as replayed
    /// within its freshness window (the model keeps those of applied commands for longer).
    pub(super) fn remember(&mut self, fingerprint: &str, at: u64, freshness: Duration) {
        self.seen.insert(fingerprint.to_owned(), at);
        if self.seen.len() > 4096 {
            let window = freshness.as_millis() as u64;
            let horizon = now_ms().saturating_sub(2 * window);
            self.seen.retain(|_, at| *at >= horizon);
        }
    }

    fn user_key(&self, user: &Actor) -> Option<UserKey> {
        self.model.state.users.get(user).map(|u| u.key.clone())
    }

    /// Whether any user was ever added (the first owner is given only to an empty
    /// service).
    pub fn has_users(&self) -> bool {
        self.model.has_users
    }

    /// Appends the first owner, as the service itself, when no user was ever added.
    /// Another instance doing the same at once is harmless: the user's subject must be
    /// empty, so one append wins.
    pub async fn bootstrap_owner(
        &mut self,
        user: &Actor,
        key: &UserKey,
    ) -> Result<bool, ErrorBody> {
        self.catch_up_with_stream().await?;
        if self.model.has_users {
            return Ok(false);
        }
        let event = Event::UserAdded {
            user: user.clone(),
            roles: [handoff_domain::auth::Role::GlobalOwner].into(),
            key: key.clone(),
            daemon: None,
        };
        let id = new_command_id();
        let ctx = Context {
            command: id,
            actor: system_actor(),
            at_ms: now_ms(),
        };
        let messages = self.messages(&ctx, "bootstrap", &[event], true, None);
        match self.log.append(&messages).await {
            Ok(a) => {
                self.appended = self.appended.max(a.last_seq);
                Ok(true)
            }
            Err(AppendError::Conflict { .. }) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Records a refused request as a `CommandRefused` event (the audit trail), on its
    /// reason's subject, which other instances' refusals share: a conflict is another
    /// refusal recorded meanwhile, so this one is appended again after it.
    pub async fn record_refusal(
        &mut self,
        request: &CommandRequest<Command>,
        error: &ErrorBody,
    ) -> Result<(), ErrorBody> {
        // The reason's subject may hold a refusal this instance appended but has not
        // folded yet.
        self.catch_up(self.appended).await?;
        let refusal = new_command_id();
        let event = Event::CommandRefused {
            refusal: refusal.clone(),
            user: request.actor.clone(),
            command: request.command.name().to_owned(),
            command_id: request.id.clone(),
            reason: error.reason.clone(),
            message: error.message.clone(),
            client: request.client.clone(),
        };
        for _attempt in 0..MAX_ATTEMPTS {
            match self
                .append_alone(refusal.clone(), system_actor(), "refusal", event.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(AppendError::Conflict { .. }) => self.catch_up_with_stream().await?,
                Err(e) => return Err(append_failure(e)),
            }
        }
        Err(too_many_conflicts(&refusal))
    }
}
