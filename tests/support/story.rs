//! A module's story, played once for all its tests: real processes take seconds to start
//! and minutes to tell a whole story, so the story records what happened and each test
//! asserts one rule on the record.

use std::future::Future;
use std::sync::{mpsc, OnceLock};

use anyhow::Result;
use handoff_testkit::Child;

use crate::stack::Stack;

/// What a story keeps alive until the test process ends: its processes, its stack and
/// its directories (the processes' logs, which a failed test points to). Dropped in that
/// order: the processes stop before the server they talk to and the files they write.
#[derive(Default)]
pub struct Keep {
    processes: Vec<Child>,
    stacks: Vec<Stack>,
    dirs: Vec<tempfile::TempDir>,
}

impl Keep {
    /// Keeps a process running (a [`crate::Proc`], a [`crate::ProjectorProcess`]).
    pub fn process(&mut self, p: impl Into<Child>) -> &mut Self {
        self.processes.push(p.into());
        self
    }

    pub fn stack(&mut self, stack: Stack) -> &mut Self {
        self.stacks.push(stack);
        self
    }

    pub fn dir(&mut self, dir: tempfile::TempDir) -> &mut Self {
        self.dirs.push(dir);
        self
    }
}

/// The stack of the thread a story runs on.
const STORY_STACK: usize = 64 << 20;

/// Plays a module's story once and hands every test its record (`play` returns it with
/// what must stay alive). The story runs in a thread and runtime of its own that live as
/// long as the test process: the processes it starts die with the thread that started
/// them.
pub fn story_once<T, F, Fut>(cell: &'static OnceLock<Result<T, String>>, play: F) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = (Result<T>, Keep)>,
{
    let result = cell.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        // A story is one long future: on the heap, and polled on a roomy stack (an
        // unoptimised build's frames are large).
        let story = std::thread::Builder::new()
            .name("story".into())
            .stack_size(STORY_STACK);
        let spawned = story.spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            let (record, _keep) = rt.block_on(Box::pin(play()));
            // Ignored: the receiver waits for this one message and is gone only if the
            // test thread itself died.
            let _ = tx.send(record.map_err(|e| format!("{e:#}")));
            // Parked, not polled: the thread must outlive every test for its children.
            loop {
                std::thread::park();
            }
        });
        if let Err(e) = spawned {
            return Err(format!("cannot start the story thread: {e}"));
        }
        rx.recv()
            .unwrap_or_else(|_| Err("the story thread died".into()))
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("the story failed: {e}"),
    }
}
