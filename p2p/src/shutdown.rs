//! The termination signal of the binaries: SIGTERM or SIGINT (Ctrl-C).
//!
//! Handlers are installed by [`Termination::install`] (synchronously, inside the
//! runtime) before a binary announces that it is up, so a signal sent right after the
//! announcement is never lost to the default action.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Installed SIGTERM and SIGINT handlers.
#[derive(Debug)]
pub struct Termination {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Termination {
    /// Installs the handlers now (call inside the tokio runtime).
    pub fn install() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves at the first SIGTERM or SIGINT.
    pub async fn wait(mut self) {
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}
