//! Where each running job is, for the heartbeat to report (`HeartbeatRequest.job_progress`
//! → `GetJob` → `arcadectl job watch`): the phase (`checking`, `fetching`, `before`,
//! `commands`, `on_success`, `on_failure`, `after`), what runs in it, and the steps done
//! out of those planned. `run_job` moves it along; the runtime drops a job's entry when
//! the job ends. Cheap to clone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arcade_proto::v1 as pb;

/// The progress of every running job.
#[derive(Clone, Debug, Default)]
pub struct ProgressBoard {
    jobs: Arc<Mutex<HashMap<String, pb::JobProgress>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ProgressBoard {
    /// `job` starts with `steps_total` steps planned.
    pub fn start(&self, job: &str, steps_total: u32) {
        self.jobs.lock().expect("progress lock").insert(
            job.to_owned(),
            pb::JobProgress {
                job_id: job.to_owned(),
                phase: "checking".into(),
                steps_total,
                phase_started_at: now_ms(),
                ..Default::default()
            },
        );
    }

    /// `job` enters `phase` (a new phase restarts its clock), running `current`.
    pub fn phase(&self, job: &str, phase: &str, current: &str) {
        if let Some(p) = self.jobs.lock().expect("progress lock").get_mut(job) {
            if p.phase != phase {
                p.phase = phase.to_owned();
                p.phase_started_at = now_ms();
            }
            p.current = current.to_owned();
        }
    }

    /// One more step of `job` finished.
    pub fn step(&self, job: &str) {
        if let Some(p) = self.jobs.lock().expect("progress lock").get_mut(job) {
            p.steps_done = p.steps_done.saturating_add(1);
        }
    }

    /// `job` ended: nothing more to report.
    pub fn finish(&self, job: &str) {
        self.jobs.lock().expect("progress lock").remove(job);
    }

    /// Every running job's progress.
    pub fn snapshot(&self) -> Vec<pb::JobProgress> {
        self.jobs
            .lock()
            .expect("progress lock")
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(b: &ProgressBoard, job: &str) -> Option<pb::JobProgress> {
        b.snapshot().into_iter().find(|p| p.job_id == job)
    }

    #[test]
    fn phases_steps_and_finish() {
        let b = ProgressBoard::default();
        b.start("j", 3);
        assert_eq!(get(&b, "j").unwrap().phase, "checking");
        b.phase("j", "fetching", "p@1.0.0");
        b.step("j");
        let p = get(&b, "j").unwrap();
        assert_eq!(
            (p.phase.as_str(), p.current.as_str(), p.steps_done),
            ("fetching", "p@1.0.0", 1)
        );
        b.phase("j", "commands", "make");
        b.step("j");
        b.step("j");
        b.step("j"); // more than planned: counted, never wraps
        assert_eq!(get(&b, "j").unwrap().steps_done, 4);
        assert_eq!(b.snapshot().len(), 1);
        b.finish("j");
        assert!(b.snapshot().is_empty());
        b.phase("gone", "after", ""); // unknown jobs are ignored
        assert!(get(&b, "gone").is_none());
    }
}
