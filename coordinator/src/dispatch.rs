//! Job dispatch (sans-IO): which queued job an agent gets and which waiting agent a new
//! job goes to, decided in memory so that the cost of one job does not grow with the
//! fleet.
//!
//! - **Needs.** A job's *need* is the labels an agent must carry to run it: its label
//!   selector plus the `allowed_labels` of every plugin it requires (a selector and an
//!   access rule asking two values of one key make a need no agent can meet).
//! - **Queue by need.** Queued jobs are grouped in classes of equal need, each in
//!   arrival order. An agent asking for work scans the classes (few: one per distinct
//!   need, not per job or per agent) and takes the oldest job of a class it satisfies.
//! - **Waiters by label.** An agent long-polling with nothing to take is a waiter,
//!   indexed by each of its labels. A new job goes to **one** waiter that satisfies its
//!   need, found through the smallest index of the need's labels (any waiter when the
//!   need is empty), oldest waiter first — not to every waiter.
//! - **Hand-off.** The job is handed to the waiter through its [`Handoff`] inside
//!   [`Dispatch::enqueue`]; a waiter whose receiver is gone refuses it and the next
//!   candidate is tried, so a job is never lost between queue and waiter. The waiter
//!   then makes the job durable as leased (`MetaStore::claim_job`, one write); if that
//!   fails it gives the job back with [`Dispatch::restore`], at its old place.
//!
//! The struct holds no clock and does no I/O; the `Agent` service drives it under a
//! mutex held only for these in-memory steps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arcade_p2p::labels::Labels;

/// The labels an agent must carry to run a job, sorted; a key may appear twice with
/// different values, which no agent satisfies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Need(Vec<(String, String)>);

impl Need {
    /// The need of a job with `selector` whose plugins require `acls`.
    pub fn new<'a>(selector: &Labels, acls: impl IntoIterator<Item = &'a Labels>) -> Self {
        let mut pairs: Vec<(String, String)> = selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for acl in acls {
            pairs.extend(acl.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        pairs.sort();
        pairs.dedup();
        Self(pairs)
    }

    /// Whether an agent with `labels` may run the job.
    pub fn satisfied_by(&self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// A key asked with two values, if any (then no agent can ever run the job).
    pub fn conflict(&self) -> Option<&str> {
        self.0
            .windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| w[0].0.as_str())
    }

    /// The required labels as `key=value`.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

/// A job waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    /// Its id.
    pub job_id: String,
    /// What an agent needs to run it.
    pub need: Arc<Need>,
    /// Arrival order (smaller = older).
    pub seq: u64,
}

/// How a job reaches a waiting agent: `Err` gives the job back when the agent is gone.
pub trait Handoff {
    /// Hands `job` over.
    fn offer(self, job: QueuedJob) -> Result<(), QueuedJob>;
}

impl Handoff for tokio::sync::oneshot::Sender<QueuedJob> {
    fn offer(self, job: QueuedJob) -> Result<(), QueuedJob> {
        self.send(job)
    }
}

/// A waiting agent's ticket.
pub type WaiterId = u64;

struct Waiter<H> {
    labels: Arc<Labels>,
    handoff: H,
}

/// The queue and the waiters. See the module doc.
pub struct Dispatch<H> {
    next_seq: u64,
    next_waiter: WaiterId,
    classes: HashMap<Arc<Need>, BTreeMap<u64, String>>,
    /// Job id → (need, seq), to remove a queued job.
    jobs: HashMap<String, (Arc<Need>, u64)>,
    waiters: BTreeMap<WaiterId, Waiter<H>>,
    by_label: HashMap<(String, String), BTreeSet<WaiterId>>,
}

impl<H> Default for Dispatch<H> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            next_waiter: 0,
            classes: HashMap::new(),
            jobs: HashMap::new(),
            waiters: BTreeMap::new(),
            by_label: HashMap::new(),
        }
    }
}

impl<H: Handoff> Dispatch<H> {
    /// Jobs queued.
    pub fn queued(&self) -> usize {
        self.jobs.len()
    }

    /// Agents waiting.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Distinct needs among queued jobs.
    pub fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Whether `job_id` is queued here.
    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.contains_key(job_id)
    }

    /// Queues a new job: handed to one waiter that may run it, else queued. Returns
    /// the waiter it went to.
    pub fn enqueue(&mut self, job_id: String, need: Need) -> Option<WaiterId> {
        self.next_seq += 1;
        let job = QueuedJob {
            job_id,
            need: Arc::new(need),
            seq: self.next_seq,
        };
        self.place(job)
    }

    /// Gives back a job handed out but not leased, at its old place in the queue.
    pub fn restore(&mut self, job: QueuedJob) -> Option<WaiterId> {
        self.place(job)
    }

    fn place(&mut self, mut job: QueuedJob) -> Option<WaiterId> {
        loop {
            let Some(id) = self.find_waiter(&job.need) else {
                let need = self.intern(&job.need);
                self.jobs
                    .insert(job.job_id.clone(), (need.clone(), job.seq));
                self.classes
                    .entry(need)
                    .or_default()
                    .insert(job.seq, job.job_id);
                return None;
            };
            let waiter = self.remove_waiter(id).expect("found waiter exists");
            match waiter.handoff.offer(job) {
                Ok(()) => return Some(id),
                Err(back) => job = back,
            }
        }
    }

    /// The class key equal to `need` (one `Arc` per distinct need).
    fn intern(&self, need: &Arc<Need>) -> Arc<Need> {
        self.classes
            .get_key_value(need)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| need.clone())
    }

    /// The oldest waiter that satisfies `need`.
    fn find_waiter(&self, need: &Need) -> Option<WaiterId> {
        if need.conflict().is_some() {
            return None;
        }
        let Some((first, rest)) = need.0.split_first() else {
            return self.waiters.keys().next().copied();
        };
        let mut smallest = self.by_label.get(first)?;
        for pair in rest {
            let set = self.by_label.get(pair)?;
            if set.len() < smallest.len() {
                smallest = set;
            }
        }
        smallest
            .iter()
            .copied()
            .find(|id| need.satisfied_by(&self.waiters[id].labels))
    }

    /// Takes the oldest queued job an agent with `labels` may run.
    pub fn take(&mut self, labels: &Labels) -> Option<QueuedJob> {
        let (need, seq) = self
            .classes
            .iter()
            .filter(|(need, _)| need.satisfied_by(labels))
            .filter_map(|(need, q)| q.keys().next().map(|seq| (need.clone(), *seq)))
            .min_by_key(|(_, seq)| *seq)?;
        let class = self.classes.get_mut(&need).expect("class exists");
        let job_id = class.remove(&seq).expect("head exists");
        if class.is_empty() {
            self.classes.remove(&need);
        }
        self.jobs.remove(&job_id);
        Some(QueuedJob { job_id, need, seq })
    }

    /// Removes a queued job (cancelled); false when it is not queued here.
    pub fn remove(&mut self, job_id: &str) -> bool {
        let Some((need, seq)) = self.jobs.remove(job_id) else {
            return false;
        };
        if let Some(class) = self.classes.get_mut(&need) {
            class.remove(&seq);
            if class.is_empty() {
                self.classes.remove(&need);
            }
        }
        true
    }

    /// Registers a waiting agent.
    pub fn wait(&mut self, labels: Arc<Labels>, handoff: H) -> WaiterId {
        self.next_waiter += 1;
        let id = self.next_waiter;
        for (k, v) in labels.iter() {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(id);
        }
        self.waiters.insert(id, Waiter { labels, handoff });
        id
    }

    /// Ends a wait; false when the waiter was already handed a job (or gone).
    pub fn stop_waiting(&mut self, id: WaiterId) -> bool {
        self.remove_waiter(id).is_some()
    }

    fn remove_waiter(&mut self, id: WaiterId) -> Option<Waiter<H>> {
        let waiter = self.waiters.remove(&id)?;
        for (k, v) in waiter.labels.iter() {
            let key = (k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&key) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
        Some(waiter)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// A hand-off that records what it got, or refuses (a departed agent).
    #[derive(Clone)]
    struct Inbox(Rc<RefCell<Vec<String>>>, bool);

    impl Handoff for Inbox {
        fn offer(self, job: QueuedJob) -> Result<(), QueuedJob> {
            if self.1 {
                return Err(job);
            }
            self.0.borrow_mut().push(job.job_id);
            Ok(())
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn need(pairs: &[(&str, &str)]) -> Need {
        Need::new(&labels(pairs), [])
    }

    #[test]
    fn a_new_job_goes_to_one_eligible_waiter_oldest_first() {
        let mut d = Dispatch::default();
        let inboxes: Vec<Inbox> = (0..1000)
            .map(|_| Inbox(Rc::new(RefCell::new(Vec::new())), false))
            .collect();
        let mut ids = Vec::new();
        for (i, inbox) in inboxes.iter().enumerate() {
            let team = if i % 2 == 0 { "red" } else { "blue" };
            ids.push(d.wait(Arc::new(labels(&[("team", team)])), inbox.clone()));
        }
        let got = d.enqueue("j1".into(), need(&[("team", "blue")]));
        assert_eq!(got, Some(ids[1]), "the oldest blue waiter");
        let handed: usize = inboxes.iter().map(|i| i.0.borrow().len()).sum();
        assert_eq!(handed, 1, "exactly one waiter is woken");
        assert_eq!(inboxes[1].0.borrow().as_slice(), ["j1"]);
        assert_eq!(d.waiting(), 999);
        assert_eq!(d.queued(), 0);
        // An empty need goes to the oldest waiter of all.
        assert_eq!(d.enqueue("j2".into(), Need::default()), Some(ids[0]));
    }

    #[test]
    fn a_job_nobody_waiting_may_run_stays_queued_for_the_right_agent() {
        let mut d = Dispatch::default();
        let inbox = Inbox(Rc::new(RefCell::new(Vec::new())), false);
        d.wait(Arc::new(labels(&[("team", "red")])), inbox.clone());
        assert_eq!(d.enqueue("blue".into(), need(&[("team", "blue")])), None);
        assert_eq!(d.enqueue("any".into(), Need::default()), Some(1));
        assert_eq!(d.queued(), 1);
        assert!(d.take(&labels(&[("team", "red")])).is_none());
        let job = d.take(&labels(&[("team", "blue"), ("zone", "x")])).unwrap();
        assert_eq!(job.job_id, "blue");
        assert_eq!(d.queued(), 0);
        assert_eq!(d.classes(), 0);
    }

    #[test]
    fn take_returns_the_oldest_job_across_classes() {
        let mut d: Dispatch<Inbox> = Dispatch::default();
        d.enqueue("a".into(), need(&[("os", "linux")]));
        d.enqueue("b".into(), Need::default());
        d.enqueue("c".into(), need(&[("os", "linux")]));
        let linux = labels(&[("os", "linux")]);
        let order: Vec<String> = std::iter::from_fn(|| d.take(&linux).map(|j| j.job_id)).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn a_departed_waiter_refuses_and_the_next_one_gets_the_job() {
        let mut d = Dispatch::default();
        let gone = Inbox(Rc::new(RefCell::new(Vec::new())), true);
        let here = Inbox(Rc::new(RefCell::new(Vec::new())), false);
        d.wait(Arc::new(Labels::new()), gone);
        let second = d.wait(Arc::new(Labels::new()), here.clone());
        assert_eq!(d.enqueue("j".into(), Need::default()), Some(second));
        assert_eq!(here.0.borrow().as_slice(), ["j"]);
        // With no one left, a refused job is queued, not lost.
        let gone = Inbox(Rc::new(RefCell::new(Vec::new())), true);
        d.wait(Arc::new(Labels::new()), gone);
        assert_eq!(d.enqueue("k".into(), Need::default()), None);
        assert!(d.contains("k"));
        assert_eq!(d.waiting(), 0);
    }

    #[test]
    fn restore_keeps_the_place_and_remove_cancels() {
        let mut d: Dispatch<Inbox> = Dispatch::default();
        d.enqueue("old".into(), Need::default());
        d.enqueue("new".into(), Need::default());
        let taken = d.take(&Labels::new()).unwrap();
        assert_eq!(taken.job_id, "old");
        d.restore(taken);
        assert!(d.remove("new"));
        assert!(!d.remove("new"));
        assert_eq!(d.take(&Labels::new()).unwrap().job_id, "old");
        assert!(d.take(&Labels::new()).is_none());
    }

    #[test]
    fn stop_waiting_tells_whether_a_job_was_handed_over() {
        let mut d = Dispatch::default();
        let inbox = Inbox(Rc::new(RefCell::new(Vec::new())), false);
        let a = d.wait(Arc::new(Labels::new()), inbox.clone());
        let b = d.wait(Arc::new(Labels::new()), inbox);
        d.enqueue("j".into(), Need::default());
        assert!(!d.stop_waiting(a), "a was handed the job");
        assert!(d.stop_waiting(b));
        assert!(d.by_label.is_empty());
    }

    #[test]
    fn conflicting_needs_are_never_satisfied() {
        let n = Need::new(&labels(&[("team", "red")]), [&labels(&[("team", "blue")])]);
        assert_eq!(n.conflict(), Some("team"));
        assert!(!n.satisfied_by(&labels(&[("team", "red")])));
        let mut d = Dispatch::default();
        let inbox = Inbox(Rc::new(RefCell::new(Vec::new())), false);
        d.wait(Arc::new(labels(&[("team", "red")])), inbox);
        assert_eq!(d.enqueue("j".into(), n), None);
        assert!(d.take(&labels(&[("team", "red")])).is_none());
    }
}
