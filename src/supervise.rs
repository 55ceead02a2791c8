//! Supervision of the core tasks (leader view, discovery, check loops, listeners, admin): a
//! task that ends while it should still run, or panics, is reported, so [`crate::Proxy::run`]
//! can log why and return an error, and the process exits non-zero for its own supervisor
//! (systemd, the Fly machine) to restart it. A proxy that limps on without its leader view
//! would drain every session and route nothing while `/healthz` said all was well.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A test hook, read once at start-up: the core task of this name panics as it starts, so a test
/// can watch the real binary exit non-zero. Not for production use.
#[doc(hidden)]
pub const TEST_PANIC_VAR: &str = "ROLEPROXY_TEST_PANIC";

/// A core task that ended while it should still run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnded {
    pub task: &'static str,
    pub reason: String,
}

impl std::fmt::Display for TaskEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} task ended: {}", self.task, self.reason)
    }
}

/// Spawns core tasks and reports the ones that end unexpectedly. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    ended: mpsc::UnboundedSender<TaskEnded>,
    /// The first task that ended, for `/healthz`.
    first: Arc<Mutex<Option<TaskEnded>>>,
    /// The task the test hook makes panic.
    doomed: Option<Arc<str>>,
}

impl Supervisor {
    pub fn new() -> (Supervisor, mpsc::UnboundedReceiver<TaskEnded>) {
        let (ended, rx) = mpsc::unbounded_channel();
        let doomed = std::env::var(TEST_PANIC_VAR)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Arc::from);
        let supervisor = Supervisor {
            ended,
            first: Arc::new(Mutex::new(None)),
            doomed,
        };
        (supervisor, rx)
    }

    /// Runs `task`; if it returns before `stop` is cancelled, or panics, that is reported. The
    /// handle ends when the task does.
    pub fn spawn<F>(&self, task: &'static str, stop: CancellationToken, future: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let doomed = self.doomed.as_deref() == Some(task);
        let inner = tokio::spawn(async move {
            if doomed {
                panic!("{TEST_PANIC_VAR}={task}");
            }
            future.await
        });
        let supervisor = self.clone();
        tokio::spawn(async move {
            let reason = match inner.await {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => "returned while it should still run".to_string(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                // Aborted on purpose (its owner is stopping it).
                Err(_) => return,
            };
            supervisor.report(TaskEnded { task, reason });
        })
    }

    fn report(&self, ended: TaskEnded) {
        tracing::error!(task = ended.task, reason = %ended.reason, "core task ended; stopping so the supervisor restarts the process");
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert_with(|| ended.clone());
        }
        let _ = self.ended.send(ended);
    }

    /// The first core task that ended, if any: `/healthz` answers 503 naming it.
    pub fn failure(&self) -> Option<TaskEnded> {
        self.first.lock().ok().and_then(|f| f.clone())
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_returns_or_panics_is_reported_and_a_stopped_one_is_not() {
        let (supervisor, mut ended) = Supervisor::new();
        let stop = CancellationToken::new();
        supervisor.spawn("returns", stop.clone(), async {});
        let first = ended.recv().await.expect("reported");
        assert_eq!(first.task, "returns");
        supervisor.spawn("panics", stop.clone(), async { panic!("boom") });
        let second = ended.recv().await.expect("reported");
        assert_eq!(
            (second.task, second.reason.as_str()),
            ("panics", "panicked: boom")
        );
        assert_eq!(supervisor.failure().map(|f| f.task), Some("returns"));

        let stopped = CancellationToken::new();
        stopped.cancel();
        supervisor.spawn("stopped", stopped, async {});
        supervisor.spawn("last", stop, async {});
        assert_eq!(ended.recv().await.map(|e| e.task), Some("last"));
    }
}
