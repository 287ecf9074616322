//! Who an agent is: the enrolment tokens and the labels they grant, the binding of an
//! agent id to its key (checked at every `Register`), and the mesh peers whose tickets
//! were revoked.
//!
//! - **Enrolment.** The fleet-wide enrolment token enrols any id but grants no label;
//!   an admin-created token ([`EnrollGrant`]) grants labels and may be limited to an id
//!   pattern, an expiry and a number of new ids. An agent may carry a *restricted* label
//!   (a key in `agents.restricted_label_keys` or used by any plugin's `allowed_labels`)
//!   only with the value a token granted it; granted labels are added by the coordinator
//!   whatever the agent declares.
//! - **Binding.** The first `Register` of an id binds it to the key that signed it
//!   (`arcade_p2p::identity`; an agent's mesh peer id, when it has one, is that key's); the store refuses a later record for that id with another
//!   key, or with a proof not later than the last one (a replay). Removing the agent
//!   ends the binding.
//! - **Revocation.** Removing an agent revokes its peer id until its last ticket expires;
//!   heartbeat answers carry the revocations an agent has not seen, so every peer refuses
//!   it within a heartbeat interval.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use arcade_p2p::labels::Labels;
use arcade_proto::v1 as pb;
use tonic::{Request, Status};

use super::{Shared, caller_hash, now_ms, shown};
use crate::store::{AgentRecord, EnrollGrant};

/// Most revocations remembered; the oldest are forgotten beyond (their tickets expire
/// within `mesh.ticket_ttl` anyway).
const MAX_REVOCATIONS: usize = 65_536;
/// Most revocations sent in one heartbeat answer (the rest follow in the next ones).
const MAX_REVOCATIONS_PER_ANSWER: usize = 4096;

/// Which token a `Register` came with.
#[derive(Debug, Clone)]
pub(crate) enum Enroller {
    /// The fleet-wide enrolment token: any id, no restricted label.
    Fleet,
    /// An admin-created token.
    Grant(EnrollGrant),
}

/// What `Register` may record for an agent.
pub(crate) struct Admission {
    /// The signing key, as a peer id.
    pub(crate) key_id: String,
    /// Its labels: what it declared plus what was granted.
    pub(crate) labels: Labels,
    /// Every label granted to it so far.
    pub(crate) granted: Labels,
    /// Which grant to count a use against (a new id enrolled with a grant).
    pub(crate) count_use: Option<String>,
}

/// Revoked peer ids in the order they were revoked, numbered.
#[derive(Debug)]
struct Revocations {
    /// The number of the next revocation (starts at the start time in ms, so numbers
    /// keep growing across restarts and an agent's "seen up to" stays meaningful).
    next: u64,
    /// (number, peer id, expiry unix ms), oldest first.
    log: VecDeque<(u64, String, i64)>,
}

/// The identity state (see the module doc).
#[derive(Debug)]
pub(crate) struct Identity {
    /// Token hash → grant.
    grants: Mutex<HashMap<[u8; 32], EnrollGrant>>,
    /// Label keys used by some plugin's `allowed_labels`.
    acl_keys: Mutex<BTreeSet<String>>,
    revoked: Mutex<Revocations>,
}

impl Identity {
    pub(crate) fn new(grants: Vec<EnrollGrant>, acl_keys: BTreeSet<String>) -> Self {
        Self {
            grants: Mutex::new(grants.into_iter().map(|g| (g.token_hash, g)).collect()),
            acl_keys: Mutex::new(acl_keys),
            revoked: Mutex::new(Revocations {
                next: now_ms().max(1) as u64,
                log: VecDeque::new(),
            }),
        }
    }

    /// Whether `hash` is an admin-created enrolment token.
    pub(crate) fn knows_grant(&self, hash: &[u8; 32]) -> bool {
        self.grants.lock().expect("grant lock").contains_key(hash)
    }

    pub(crate) fn grant(&self, hash: &[u8; 32]) -> Option<EnrollGrant> {
        self.grants.lock().expect("grant lock").get(hash).cloned()
    }

    pub(crate) fn put_grant(&self, grant: EnrollGrant) {
        self.grants
            .lock()
            .expect("grant lock")
            .insert(grant.token_hash, grant);
    }

    pub(crate) fn remove_grant(&self, hash: &[u8; 32]) {
        self.grants.lock().expect("grant lock").remove(hash);
    }

    pub(crate) fn grants(&self) -> Vec<EnrollGrant> {
        let mut all: Vec<_> = self
            .grants
            .lock()
            .expect("grant lock")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|g| g.created_at);
        all
    }

    /// Notes the label keys a plugin's `allowed_labels` uses (they become restricted).
    pub(crate) fn note_acl(&self, labels: &Labels) {
        self.acl_keys
            .lock()
            .expect("acl lock")
            .extend(labels.keys().cloned());
    }

    fn acl_restricted(&self, key: &str) -> bool {
        self.acl_keys.lock().expect("acl lock").contains(key)
    }

    /// Revokes `peer_id` until `expires_at` (unix ms).
    pub(crate) fn revoke(&self, peer_id: &str, expires_at: i64) {
        let mut r = self.revoked.lock().expect("revocation lock");
        let n = r.next;
        r.next += 1;
        r.log.push_back((n, peer_id.to_owned(), expires_at));
        while r.log.len() > MAX_REVOCATIONS {
            r.log.pop_front();
        }
    }

    /// The revocations numbered after `seen` that have not expired at `now`, and the
    /// number to report next time. A `seen` from the future (this coordinator's clock
    /// went back since the agent last asked) gets everything.
    pub(crate) fn revocations_since(&self, seen: u64, now: i64) -> (Vec<String>, u64) {
        let mut r = self.revoked.lock().expect("revocation lock");
        while r.log.front().is_some_and(|(_, _, exp)| *exp <= now) {
            r.log.pop_front();
        }
        let last = r.next - 1;
        let seen = if seen > last { 0 } else { seen };
        let mut out = Vec::new();
        let mut upto = last;
        for (n, peer, exp) in &r.log {
            if *n <= seen || *exp <= now {
                continue;
            }
            if out.len() == MAX_REVOCATIONS_PER_ANSWER {
                upto = n - 1;
                break;
            }
            out.push(peer.clone());
        }
        (out, upto)
    }
}

impl Shared {
    /// Checks the enrolment token of a `Register`: the fleet-wide one or an
    /// admin-created one that has not expired.
    pub(crate) fn require_enrollment<T>(&self, req: &Request<T>) -> Result<Enroller, Status> {
        let hash = caller_hash(req)?;
        if hash == self.enroll_hash {
            return Ok(Enroller::Fleet);
        }
        match self.identity.grant(&hash) {
            Some(g) if g.expires_at != 0 && now_ms() >= g.expires_at => {
                Err(Status::unauthenticated(format!(
                    "enrolment token {} has expired: ask the admin for a new one (`arcadectl enroll create`)",
                    g.id
                )))
            }
            Some(g) => Ok(Enroller::Grant(g)),
            None => Err(Status::unauthenticated("invalid enrollment token")),
        }
    }

    /// Whether `key` may only carry granted values.
    fn restricted(&self, key: &str) -> bool {
        self.config
            .raw
            .agents
            .restricted_label_keys
            .iter()
            .any(|k| k == key)
            || self.identity.acl_restricted(key)
    }

    /// Checks a `Register`'s proof of identity, id and labels against the token it came
    /// with and the agent's current record (if it is registered).
    pub(crate) fn admit_registration(
        &self,
        enroller: &Enroller,
        req: &pb::RegisterRequest,
        declared: Labels,
        existing: Option<&AgentRecord>,
    ) -> Result<Admission, Status> {
        let peer = arcade_p2p::identity::verify_register(req, now_ms())
            .map_err(|e| match e {
                arcade_p2p::identity::ProofError::BadSignature => {
                    Status::unauthenticated(e.to_string())
                }
                _ => Status::invalid_argument(e.to_string()),
            })?
            .to_string();
        let same_key = existing.filter(|r| r.key_id == peer);
        if let Some(r) = existing
            && !r.key_id.is_empty()
            && same_key.is_none()
        {
            return Err(bound_elsewhere(&r.agent_id, &r.key_id));
        }
        let mut granted = same_key.map(|r| r.granted.clone()).unwrap_or_default();
        let mut count_use = None;
        if let Enroller::Grant(g) = enroller {
            if !g.admits_id(&req.agent_id) {
                return Err(Status::permission_denied(format!(
                    "enrolment token {} enrols only agent ids matching {:?}, not {:?}",
                    g.id,
                    g.id_pattern,
                    shown(&req.agent_id)
                )));
            }
            granted.extend(g.labels.clone());
            if existing.is_none() {
                count_use = Some(g.id.clone());
            }
        }
        for (k, v) in &declared {
            if self.restricted(k) && granted.get(k) != Some(v) {
                return Err(Status::permission_denied(format!(
                    "label {k}={} is restricted: only an enrolment token that grants it may give it (`arcadectl enroll create --label {k}=…`)",
                    shown(v)
                )));
            }
        }
        let mut labels = declared;
        labels.extend(granted.clone());
        if labels.len() > arcade_p2p::labels::MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "{} labels with the granted ones: at most {}",
                labels.len(),
                arcade_p2p::labels::MAX_LABELS
            )));
        }
        Ok(Admission {
            key_id: peer,
            labels,
            granted,
            count_use,
        })
    }
}

/// The refusal of a `Register` signed by another key than the id is bound to.
pub(crate) fn bound_elsewhere(agent_id: &str, peer_id: &str) -> Status {
    Status::permission_denied(format!(
        "agent id {agent_id} is bound to another key (peer {peer_id}) since its first enrolment; \
         if this is a rebuilt machine for the same id, remove the old agent first: \
         `arcadectl agent remove {agent_id}`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_are_sent_once_and_expire() {
        let id = Identity::new(Vec::new(), BTreeSet::new());
        let (none, v0) = id.revocations_since(0, 10);
        assert!(none.is_empty());
        id.revoke("p1", 100);
        id.revoke("p2", 50);
        let (all, v1) = id.revocations_since(0, 10);
        assert_eq!(all, ["p1", "p2"]);
        assert!(v1 > v0);
        let (again, v2) = id.revocations_since(v1, 10);
        assert!(again.is_empty());
        assert_eq!(v2, v1);
        id.revoke("p3", 100);
        assert_eq!(id.revocations_since(v1, 10).0, ["p3"]);
        // p2 expired: no longer sent.
        assert_eq!(id.revocations_since(0, 60).0, ["p1", "p3"]);
        // Numbers from the future (the coordinator's clock went back): everything.
        assert_eq!(id.revocations_since(u64::MAX, 60).0, ["p1", "p3"]);
    }
}
