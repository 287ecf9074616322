//! Mesh tickets: the coordinator vouches that a libp2p peer is an enrolled agent with
//! certain labels, for a limited time. A peer serves chunks only to a requester whose
//! ticket verifies against the coordinator's key, is bound to the requester's
//! (noise-authenticated) peer id and has not expired; a plugin restricted by
//! `allowed_labels` is served only when the ticket's labels satisfy them.
//!
//! Wire form: a protobuf `SignedTicket { ticket, signature }` where `ticket` is the
//! encoded `MeshTicket` and `signature` is the coordinator's ed25519 signature over
//! exactly those bytes (so verification never depends on re-encoding).

use arcade_proto::v1 as pb;
pub use libp2p_identity::PeerId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p_identity::{Keypair, PublicKey};
use prost::Message as _;

use crate::labels::{self, Labels};

/// Largest encoded ticket accepted.
pub const MAX_TICKET_BYTES: usize = 4096;

/// A ticket that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a well-formed signed ticket.
    #[error("malformed ticket: {0}")]
    Malformed(String),
    /// The signature is not the coordinator's.
    #[error("ticket signature is not the coordinator's")]
    BadSignature,
    /// Issued to another peer (a replayed or stolen ticket).
    #[error("ticket was issued to peer {ticket}, not to {remote}")]
    WrongPeer {
        /// The peer in the ticket.
        ticket: String,
        /// The requesting peer.
        remote: String,
    },
    /// Past its expiry.
    #[error("ticket expired at {expired_at_ms} (now {now_ms})")]
    Expired {
        /// Expiry, unix ms.
        expired_at_ms: i64,
        /// Now, unix ms.
        now_ms: i64,
    },
    /// The key material is unusable.
    #[error("invalid mesh key: {0}")]
    Key(String),
}

/// A verified ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The peer it was issued to.
    pub peer_id: PeerId,
    /// The agent id.
    pub agent_id: String,
    /// The agent's labels when the ticket was issued.
    pub labels: Labels,
    /// Unix ms.
    pub issued_at_ms: i64,
    /// Unix ms.
    pub expires_at_ms: i64,
}

impl Ticket {
    /// Whether the holder may get content restricted to `required` labels.
    pub fn allows(&self, required: &Labels) -> bool {
        labels::satisfies(&self.labels, required)
    }
}

/// Issues tickets (the coordinator side). Holds an ed25519 keypair.
#[derive(Clone)]
pub struct TicketIssuer {
    keypair: Keypair,
}

impl std::fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("public_key", &hex::encode(self.public_key()))
            .finish()
    }
}

impl TicketIssuer {
    /// A new random ed25519 key.
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// Restores a key saved with [`TicketIssuer::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TicketError> {
        let keypair =
            Keypair::from_protobuf_encoding(bytes).map_err(|e| TicketError::Key(e.to_string()))?;
        keypair
            .public()
            .try_into_ed25519()
            .map_err(|_| TicketError::Key("not an ed25519 key".into()))?;
        Ok(Self { keypair })
    }

    /// The secret key for storage (keep it private: mode 0600).
    pub fn to_bytes(&self) -> Result<Vec<u8>, TicketError> {
        self.keypair
            .to_protobuf_encoding()
            .map_err(|e| TicketError::Key(e.to_string()))
    }

    /// The public key agents verify with (libp2p protobuf encoding).
    pub fn public_key(&self) -> Vec<u8> {
        self.keypair.public().encode_protobuf()
    }

    /// Issues a signed ticket for `peer_id`.
    pub fn issue(
        &self,
        peer_id: &PeerId,
        agent_id: &str,
        labels: &Labels,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Vec<u8>, TicketError> {
        let ticket = pb::MeshTicket {
            peer_id: peer_id.to_string(),
            agent_id: agent_id.to_owned(),
            labels: labels::to_proto(labels),
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        }
        .encode_to_vec();
        let signature = self
            .keypair
            .sign(&ticket)
            .map_err(|e| TicketError::Key(e.to_string()))?;
        Ok(pb::SignedTicket { ticket, signature }.encode_to_vec())
    }
}

/// Most verified tickets remembered (about one per connected peer); the memory is
/// cleared when it is full.
const MAX_REMEMBERED: usize = 1024;

/// Verifies tickets (the serving peer's side).
///
/// Every request carries its ticket, so a verifier remembers the tickets it has
/// verified, by the peer that presented them: the same bytes from the same peer skip
/// the signature check (the expiry is still checked every time). The memory is shared
/// by clones and bounded by [`MAX_REMEMBERED`].
#[derive(Debug, Clone)]
pub struct TicketVerifier {
    key: PublicKey,
    verified: Arc<Mutex<Remembered>>,
}

/// Verified tickets by the peer that presented them: (its bytes, the ticket).
type Remembered = HashMap<PeerId, (Vec<u8>, Ticket)>;

impl TicketVerifier {
    /// A verifier for the coordinator key `public_key` (libp2p protobuf encoding).
    pub fn new(public_key: &[u8]) -> Result<Self, TicketError> {
        let key = PublicKey::try_decode_protobuf(public_key)
            .map_err(|e| TicketError::Key(e.to_string()))?;
        Ok(Self {
            key,
            verified: Arc::default(),
        })
    }

    /// Checks `bytes` for a request from `remote` at `now_ms`.
    pub fn verify(
        &self,
        bytes: &[u8],
        remote: &PeerId,
        now_ms: i64,
    ) -> Result<Ticket, TicketError> {
        if bytes.len() > MAX_TICKET_BYTES {
            return Err(TicketError::Malformed(format!(
                "{} bytes is over the {MAX_TICKET_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let expired = |t: &Ticket| TicketError::Expired {
            expired_at_ms: t.expires_at_ms,
            now_ms,
        };
        if let Some((seen, t)) = self.verified.lock().expect("ticket memory").get(remote)
            && seen.as_slice() == bytes
        {
            return if now_ms >= t.expires_at_ms {
                Err(expired(t))
            } else {
                Ok(t.clone())
            };
        }
        let ticket = self.verify_signed(bytes, remote)?;
        if now_ms >= ticket.expires_at_ms {
            return Err(expired(&ticket));
        }
        let mut memory = self.verified.lock().expect("ticket memory");
        if memory.len() >= MAX_REMEMBERED {
            memory.clear();
        }
        memory.insert(*remote, (bytes.to_vec(), ticket.clone()));
        Ok(ticket)
    }

    /// The full check: signature, encoding and peer binding (not the expiry).
    fn verify_signed(&self, bytes: &[u8], remote: &PeerId) -> Result<Ticket, TicketError> {
        let signed =
            pb::SignedTicket::decode(bytes).map_err(|e| TicketError::Malformed(e.to_string()))?;
        if !self.key.verify(&signed.ticket, &signed.signature) {
            return Err(TicketError::BadSignature);
        }
        let t = pb::MeshTicket::decode(signed.ticket.as_slice())
            .map_err(|e| TicketError::Malformed(e.to_string()))?;
        let peer_id: PeerId = t
            .peer_id
            .parse()
            .map_err(|_| TicketError::Malformed("peer_id is not a libp2p peer id".into()))?;
        if &peer_id != remote {
            return Err(TicketError::WrongPeer {
                ticket: peer_id.to_string(),
                remote: remote.to_string(),
            });
        }
        let labels =
            labels::from_proto(&t.labels).map_err(|e| TicketError::Malformed(e.to_string()))?;
        Ok(Ticket {
            peer_id,
            agent_id: t.agent_id,
            labels,
            issued_at_ms: t.issued_at_ms,
            expires_at_ms: t.expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn issued_ticket_verifies_for_its_peer_only() {
        let issuer = TicketIssuer::generate();
        let verifier = TicketVerifier::new(&issuer.public_key()).unwrap();
        let me = PeerId::random();
        let other = PeerId::random();
        let bytes = issuer
            .issue(&me, "a1", &labels(&[("team", "red")]), 1_000, 60_000)
            .unwrap();
        let t = verifier.verify(&bytes, &me, 2_000).unwrap();
        assert_eq!(t.agent_id, "a1");
        assert!(t.allows(&labels(&[("team", "red")])));
        assert!(!t.allows(&labels(&[("team", "blue")])));
        assert!(matches!(
            verifier.verify(&bytes, &other, 2_000),
            Err(TicketError::WrongPeer { .. })
        ));
        assert!(matches!(
            verifier.verify(&bytes, &me, 61_000),
            Err(TicketError::Expired { .. })
        ));
    }

    #[test]
    fn forged_tampered_and_foreign_tickets_are_refused() {
        let issuer = TicketIssuer::generate();
        let verifier = TicketVerifier::new(&issuer.public_key()).unwrap();
        let me = PeerId::random();
        // Signed by another key.
        let rogue = TicketIssuer::generate()
            .issue(&me, "a1", &Labels::new(), 0, 60_000)
            .unwrap();
        assert_eq!(
            verifier.verify(&rogue, &me, 1),
            Err(TicketError::BadSignature)
        );
        // Labels changed after signing.
        let bytes = issuer
            .issue(&me, "a1", &labels(&[("team", "blue")]), 0, 60_000)
            .unwrap();
        let mut signed = pb::SignedTicket::decode(bytes.as_slice()).unwrap();
        let mut t = pb::MeshTicket::decode(signed.ticket.as_slice()).unwrap();
        t.labels[0].value = "red".into();
        signed.ticket = t.encode_to_vec();
        assert_eq!(
            verifier.verify(&signed.encode_to_vec(), &me, 1),
            Err(TicketError::BadSignature)
        );
        assert!(matches!(
            verifier.verify(&vec![0u8; MAX_TICKET_BYTES + 1], &me, 1),
            Err(TicketError::Malformed(_))
        ));
    }

    #[test]
    fn remembered_tickets_still_expire_and_stay_bound_to_their_peer() {
        let issuer = TicketIssuer::generate();
        let verifier = TicketVerifier::new(&issuer.public_key()).unwrap();
        let (me, thief) = (PeerId::random(), PeerId::random());
        let bytes = issuer.issue(&me, "a1", &Labels::new(), 0, 10_000).unwrap();
        // Verified once (remembered), then again from memory.
        assert_eq!(verifier.verify(&bytes, &me, 1).unwrap().agent_id, "a1");
        assert_eq!(
            verifier.clone().verify(&bytes, &me, 2).unwrap().agent_id,
            "a1"
        );
        // Another peer replaying the remembered bytes is still refused.
        assert!(matches!(
            verifier.verify(&bytes, &thief, 3),
            Err(TicketError::WrongPeer { .. })
        ));
        // Tampered bytes from the remembered peer are checked in full.
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(verifier.verify(&tampered, &me, 4).is_err());
        // Still valid after the tampered attempt; expired from memory too.
        assert!(verifier.verify(&bytes, &me, 5).is_ok());
        assert!(matches!(
            verifier.verify(&bytes, &me, 10_000),
            Err(TicketError::Expired { .. })
        ));
        // The memory stays bounded.
        for _ in 0..(MAX_REMEMBERED + 10) {
            let p = PeerId::random();
            let b = issuer.issue(&p, "x", &Labels::new(), 0, 10_000).unwrap();
            verifier.verify(&b, &p, 1).unwrap();
        }
        assert!(verifier.verified.lock().unwrap().len() <= MAX_REMEMBERED);
    }

    #[test]
    fn issuer_key_survives_a_round_trip() {
        let issuer = TicketIssuer::generate();
        let again = TicketIssuer::from_bytes(&issuer.to_bytes().unwrap()).unwrap();
        assert_eq!(issuer.public_key(), again.public_key());
        assert!(TicketIssuer::from_bytes(b"junk").is_err());
        assert!(TicketVerifier::new(b"junk").is_err());
    }

    proptest! {
        #[test]
        fn verifier_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let verifier = TicketVerifier::new(&TicketIssuer::generate().public_key()).unwrap();
            let _ = verifier.verify(&bytes, &PeerId::random(), 0);
        }
    }
}
