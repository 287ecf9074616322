//! Spawning and supervising one child process: process-group kill, bounded pipe
//! draining, timeout, reaping. See the parent module's docs for the rules.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

use super::tail::TailBuffer;

/// After the main child exited, how long its pipes may stay open (a background
/// grandchild still holding them) before the whole process group is killed.
pub(crate) const EXIT_GRACE: Duration = Duration::from_secs(1);

/// After the process group was killed, how long draining the pipes may still take
/// before they are abandoned (a descendant that left the group may hold them forever).
pub(crate) const DRAIN_AFTER_KILL: Duration = Duration::from_secs(2);

/// After SIGKILL, how long reaping the main child may take before giving up on it
/// (`kill_on_drop` and tokio's orphan reaper then take over).
pub(crate) const REAP_BOUND: Duration = Duration::from_secs(5);

/// Read size for the output pumps.
const READ_CHUNK: usize = 16 * 1024;

/// SIGKILLs the child's process group, explicitly and when dropped.
///
/// Dropping it (normal end, or the run's future being cancelled) kills whatever is left
/// of the group, so no descendant outlives its run.
pub(crate) struct GroupKiller {
    pgid: Option<Pid>,
}

impl GroupKiller {
    /// The child was spawned with `process_group(0)`, so its pid is the group id.
    pub(crate) fn new(child_pid: Option<u32>) -> Self {
        let pgid = child_pid
            .and_then(|pid| i32::try_from(pid).ok())
            .filter(|&pid| pid > 1)
            .map(Pid::from_raw);
        GroupKiller { pgid }
    }

    /// Sends SIGKILL to every process of the group. Returns whether the signal was
    /// delivered (false when the group is already empty or there is none).
    pub(crate) fn kill(&self) -> bool {
        let Some(pgid) = self.pgid else {
            return false;
        };
        match killpg(pgid, Signal::SIGKILL) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(err) => {
                tracing::debug!(pgid = pgid.as_raw(), %err, "killpg failed");
                false
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a supervised child ended.
pub(crate) struct Finished {
    /// The main child's exit status, if it was reaped.
    pub(crate) status: Option<ExitStatus>,
    /// Why waiting for the child failed, if it did.
    pub(crate) wait_error: Option<io::Error>,
    /// The timeout fired and the group was killed.
    pub(crate) timed_out: bool,
    /// The output pumps were abandoned before end of file (a descendant outside the
    /// process group kept a pipe open).
    pub(crate) io_abandoned: bool,
}

/// Copies `reader` into `sink` until end of file or a read error, keeping only the
/// sink's tail.
pub(crate) async fn pump<R: AsyncRead + Unpin>(mut reader: R, sink: &Mutex<TailBuffer>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => sink
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::debug!(%err, "reading child output failed");
                return;
            }
        }
    }
}

/// Waits for `child` while driving `io` (stdin feeding and output pumps), enforcing
/// `timeout` and bounding how long `io` may run once the child is gone.
///
/// The child must have been spawned in its own process group (`group`) and its stdin
/// taken out of it (tokio's `wait` would otherwise close it first).
pub(crate) async fn supervise<F>(
    child: &mut Child,
    group: &GroupKiller,
    io: F,
    timeout: Duration,
) -> Finished
where
    F: Future<Output = ()>,
{
    let mut io = pin!(io);
    // `sleep` clamps huge durations, so any timeout is safe here.
    let mut timer = pin!(tokio::time::sleep(timeout));
    let mut io_done = false;
    let mut status = None;
    let mut wait_error = None;
    let mut timed_out = false;

    // Phase 1: until the child exits or the deadline passes, draining output meanwhile.
    loop {
        tokio::select! {
            biased;
            waited = child.wait() => {
                match waited {
                    Ok(s) => status = Some(s),
                    Err(err) => wait_error = Some(err),
                }
                break;
            }
            () = &mut io, if !io_done => io_done = true,
            () = &mut timer => {
                timed_out = true;
                break;
            }
        }
    }

    if timed_out {
        // Kill the child and every descendant still in its group, then reap the child.
        if !group.kill() {
            let _ = child.start_kill();
        }
        match tokio::time::timeout(REAP_BOUND, child.wait()).await {
            Ok(Ok(s)) => status = Some(s),
            Ok(Err(err)) => wait_error = Some(err),
            Err(_) => {
                tracing::warn!("child not reaped {REAP_BOUND:?} after SIGKILL");
            }
        }
    } else if wait_error.is_some() {
        // Could not wait: make sure it dies; kill_on_drop and the reaper do the rest.
        group.kill();
        let _ = child.start_kill();
    }

    // Phase 2: bounded draining. Once the main child is gone, its pipes close unless a
    // descendant holds them; give it a short grace, then kill the group and wait a
    // little more, then abandon the pipes.
    let mut io_abandoned = false;
    if !io_done {
        let grace = if timed_out {
            DRAIN_AFTER_KILL
        } else {
            EXIT_GRACE
        };
        if tokio::time::timeout(grace, &mut io).await.is_err() {
            let killed_now = !timed_out && group.kill();
            if killed_now {
                tracing::debug!("killed descendants still holding the output pipes");
            }
            if killed_now
                && tokio::time::timeout(DRAIN_AFTER_KILL, &mut io)
                    .await
                    .is_ok()
            {
                // Drained after the kill.
            } else {
                tracing::warn!("abandoning child output pipes still held open");
                io_abandoned = true;
            }
        }
    }

    Finished {
        status,
        wait_error,
        timed_out,
        io_abandoned,
    }
}
