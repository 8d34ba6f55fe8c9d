//! What keeps the executor's memory and start-up flat (decision 0012): where a started
//! model came from, the task that stores records leaving the model's window in the
//! command archive, and saving the model.

use futures::FutureExt;

use super::*;

/// Events folded at start between two hand-overs to the archive.
const START_STEP: u64 = 1_024;

/// Where a started model came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Folded from the stream's start (no snapshot store, or no snapshot yet).
    Stream,
    /// The snapshot at this sequence, then the events after it.
    Snapshot { applied: u64 },
    /// A snapshot was there but not used (this says why): folded from the start.
    Ignored { reason: String },
}

/// The archive, and the task that stores what leaves the model's window in it.
pub(super) struct Archiver {
    pub(super) archive: Archive,
    pub(super) to_store: tokio::sync::mpsc::UnboundedSender<(CommandId, Archived)>,
    /// In a mutex only so the executor can be shared while it awaits (it is only ever
    /// locked without waiting, by the executor itself).
    stored: std::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<CommandId>>,
}

impl Archiver {
    pub(super) fn start(archive: Archive) -> Self {
        let (to_store, queue) = tokio::sync::mpsc::unbounded_channel::<(CommandId, Archived)>();
        let (done, stored) = tokio::sync::mpsc::unbounded_channel();
        let store = archive.clone();
        tokio::spawn(async move {
            let queue = futures::stream::unfold(queue, |mut q| async move {
                q.recv().await.map(|item| (item, q))
            });
            // Many at once: a fold from the start evicts records faster than one put at
            // a time would store them.
            let mut stored = queue
                .map(|(id, answer): (CommandId, Archived)| {
                    let store = store.clone();
                    async move {
                        // Until it is stored: the model keeps the record meanwhile, and
                        // answers from it.
                        let mut wait = Duration::from_millis(100);
                        while let Err(e) = store.put(&id, &answer).await {
                            tracing::warn!(%id, error = %e, "a command's answer not archived yet; again");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                        id
                    }
                })
                .buffer_unordered(64)
                .boxed();
            while let Some(id) = stored.next().await {
                if done.send(id).is_err() {
                    return;
                }
            }
        });
        Archiver {
            archive,
            to_store,
            stored: std::sync::Mutex::new(stored),
        }
    }
}

/// Where the executor keeps what bounds its memory and start-up.
pub struct Stores {
    pub archive: Archive,
    pub snapshots: Snapshots,
    /// The stores' lineage now: a snapshot saved against others is not used.
    pub lineage: Lineage,
    pub model: model::Config,
}

/// Saving the model: where, the sequence last saved, and the save under way (the
/// sequence it holds, and whether it was stored).
pub(super) struct Saving {
    pub(super) store: Snapshots,
    pub(super) lineage: Lineage,
    pub(super) saved_at: u64,
    pub(super) under_way: Option<(u64, tokio::task::JoinHandle<bool>)>,
}

impl Saving {
    /// Takes the save under way if it has ended; one that stored its model moves
    /// `saved_at` on (one that failed leaves it, so the model is saved again). False
    /// while it is still going.
    fn settle(&mut self) -> bool {
        let Some((applied, mut task)) = self.under_way.take() else {
            return true;
        };
        // Finished, yet its result may wait for the task budget: asked again later.
        match (&mut task).now_or_never() {
            None => {
                self.under_way = Some((applied, task));
                false
            }
            Some(result) => {
                if let Ok(true) = result {
                    self.saved_at = self.saved_at.max(applied);
                }
                true
            }
        }
    }
}

impl Executor {
    /// Starts from the latest snapshot when `stores` has one that verifies (else from
    /// the stream's start, saying why), folds the events after it, then is ready.
    pub async fn start_with(
        log: EventLog,
        read_timeout: Duration,
        stores: Option<Stores>,
    ) -> Result<Self, ReadError> {
        let end = log
            .last_sequence()
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        let config = stores.as_ref().map(|s| s.model).unwrap_or_default();
        let (model, origin) = match &stores {
            None => (Model::new(config), Origin::Stream),
            Some(s) => match s.snapshots.load(end, &s.lineage).await {
                Ok(mut m) => {
                    m.config = config;
                    let applied = m.applied;
                    (m, Origin::Snapshot { applied })
                }
                Err(Ignored::None) => (Model::new(config), Origin::Stream),
                Err(Ignored::Unavailable(e)) => return Err(ReadError::Unavailable(e)),
                Err(e) => {
                    tracing::error!(reason = %e, "the command model's snapshot is ignored; folding the whole stream");
                    (
                        Model::new(config),
                        Origin::Ignored {
                            reason: e.to_string(),
                        },
                    )
                }
            },
        };
        let reader = log.read_from(model.applied + 1).await?;
        let saved_at = model.applied;
        let (archive, snapshots) = match stores {
            Some(s) => (
                Some(Archiver::start(s.archive)),
                Some(Saving {
                    store: s.snapshots,
                    lineage: s.lineage,
                    saved_at,
                    under_way: None,
                }),
            ),
            None => (None, None),
        };
        let mut executor = Executor {
            log,
            reader,
            model,
            appended: 0,
            read_timeout,
            seen: HashMap::new(),
            fences: None,
            fences_due: Vec::new(),
            stopped: None,
            archive,
            snapshots,
            origin,
            drains: Default::default(),
        };
        // What a snapshot held for the archive is stored again (storing twice is harmless).
        if let Some(a) = &executor.archive {
            for (id, answer) in executor.model.archiving() {
                let _ = a.to_store.send((id.clone(), answer.clone()));
            }
        }
        // In steps, handing what leaves the window to the archive as it goes: a fold from
        // the start must not hold every record of the history at once.
        let caught_up = loop {
            let step = executor.model.applied.saturating_add(START_STEP).min(end);
            let folded = executor.catch_up(step).await;
            executor.archive_evicted();
            if folded.is_err() || step >= end {
                break folded;
            }
        };
        match caught_up {
            Ok(()) => tracing::info!(
                applied = executor.model.applied,
                origin = ?executor.origin,
                records = executor.model.records(),
                "command model loaded"
            ),
            // Started all the same, to answer every command with the reason.
            Err(_) if executor.stopped.is_some() => {}
            Err(e) => return Err(ReadError::Unavailable(e.message)),
        }
        Ok(executor)
    }

    /// Saves the model if it folded at least `after_events` events since it was last
    /// saved and no save is under way: serialised now, stored in the background (nothing
    /// waits for the store). A stopped model is never saved.
    pub fn save_snapshot(&mut self, after_events: u64) {
        // What the archive stored meanwhile need not be in the snapshot.
        self.archive_evicted();
        let Some(saving) = self.snapshots.as_mut() else {
            return;
        };
        // One at a time: two puts of the object at once could leave the older last.
        if !saving.settle() {
            return;
        }
        if self.stopped.is_some()
            || self.model.applied < saving.saved_at.saturating_add(after_events.max(1))
        {
            return;
        }
        let saved = Snapshots::encode(&self.model);
        let (store, lineage) = (saving.store.clone(), saving.lineage.clone());
        let applied = saved.applied;
        saving.under_way = Some((
            applied,
            tokio::spawn(async move {
                let bytes = saved.bytes.len();
                match store.save(saved, lineage).await {
                    Ok(()) => {
                        tracing::info!(applied, bytes, "command model saved");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, applied, "command model not saved");
                        false
                    }
                }
            }),
        ));
    }

    /// The sequence of the latest model stored.
    pub fn saved_at(&self) -> Option<u64> {
        self.snapshots.as_ref().map(|s| s.saved_at)
    }

    /// On the way out: waits for the save under way, then saves what is newer, again
    /// after a failed try, until `within` has passed.
    pub async fn save_on_stop(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        // Everything this service appended is in what it saves: its own last events may
        // not be folded yet (the fold runs between requests), and a model saved short of
        // them would be folded again at the next start.
        if self.stopped.is_none() {
            let appended = self.appended;
            match tokio::time::timeout_at(deadline, self.catch_up(appended)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e.message, "stopping short of this service's own appends")
                }
                Err(_) => tracing::warn!("stopping short of this service's own appends"),
            }
        }
        for attempt in 0u32.. {
            if attempt > 1 {
                // The last try failed: a moment for the store to come back.
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + Duration::from_millis(250)),
                )
                .await;
            }
            let Some(saving) = self.snapshots.as_mut() else {
                return;
            };
            if let Some((applied, mut task)) = saving.under_way.take() {
                match tokio::time::timeout_at(deadline, &mut task).await {
                    Err(_) => {
                        saving.under_way = Some((applied, task));
                        tracing::warn!("the command model was not saved before stopping");
                        return;
                    }
                    Ok(Ok(true)) => saving.saved_at = saving.saved_at.max(applied),
                    Ok(_) => {}
                }
            }
            if self.stopped.is_some() || self.model.applied <= saving.saved_at {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("the command model was not saved before stopping");
                return;
            }
            self.save_snapshot(1);
        }
    }

    /// Hands the records that left the model's window to the archive, and lets go of
    /// those it has stored.
    pub(super) fn archive_evicted(&mut self) {
        let evicted = self.model.take_evicted();
        let Some(a) = &self.archive else {
            // Nowhere to keep them: they stay in memory.
            return;
        };
        for id in evicted {
            if let Some(answer) = self.model.leaving(&id) {
                let _ = a.to_store.send((id, answer.clone()));
            }
        }
        let stored: Vec<CommandId> = match a.stored.lock() {
            Ok(mut rx) => std::iter::from_fn(|| rx.try_recv().ok()).collect(),
            Err(_) => Vec::new(),
        };
        for id in stored {
            self.model.archived(&id);
        }
    }
}
