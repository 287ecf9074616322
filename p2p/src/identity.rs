//! Agent identity: each agent has one long-lived key (its libp2p identity, so its peer
//! id is its key's fingerprint). At every `Register` it signs
//! `arcade-register/v1 \n <agent_id> \n <signed_at_ms>` with that key; the coordinator
//! binds the agent id to the key at first enrolment and later accepts a `Register` for
//! that id only when the same key signed it, with a timestamp later than the last one it
//! accepted (so a recorded request cannot be replayed) and within
//! [`MAX_CLOCK_SKEW_MS`] of its own clock.

use arcade_proto::v1 as pb;
use libp2p_identity::{Keypair, PeerId, PublicKey};

/// How far an agent's clock may be from the coordinator's.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// Largest encoded public key accepted.
const MAX_KEY_BYTES: usize = 1024;

/// A registration whose proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// No key or signature was sent.
    #[error(
        "Register carries no identity proof (public_key, signed_at_ms, signature): upgrade the agent"
    )]
    Missing,
    /// The key cannot be decoded.
    #[error("public_key is not a libp2p public key: {0}")]
    BadKey(String),
    /// The signature is not the key's over this request.
    #[error("the signature does not verify with public_key for this agent id and time")]
    BadSignature,
    /// `peer_id` names another key.
    #[error("peer_id {claimed} is not the peer id of public_key ({actual})")]
    PeerMismatch {
        /// What the request said.
        claimed: String,
        /// The key's peer id.
        actual: String,
    },
    /// The timestamp is too far from the coordinator's clock.
    #[error(
        "signed_at_ms {signed_at_ms} is {skew_s} s away from the coordinator's clock (at most {} s): fix the agent's clock",
        MAX_CLOCK_SKEW_MS / 1000
    )]
    Skew {
        /// The request's timestamp.
        signed_at_ms: i64,
        /// Seconds off.
        skew_s: i64,
    },
}

fn payload(agent_id: &str, signed_at_ms: i64) -> Vec<u8> {
    format!("arcade-register/v1\n{agent_id}\n{signed_at_ms}").into_bytes()
}

/// Fills in `req`'s proof with `key` at `now_ms` (its `peer_id`, when set, must be this
/// key's: an agent's mesh identity is its key).
pub fn sign_register(req: &mut pb::RegisterRequest, key: &Keypair, now_ms: i64) {
    req.public_key = key.public().encode_protobuf();
    req.signed_at_ms = now_ms;
    // Signing with an ed25519 (or any in-memory) key does not fail.
    req.signature = key
        .sign(&payload(&req.agent_id, now_ms))
        .unwrap_or_default();
}

/// Checks `req`'s proof at `now_ms`; the peer id of the key that signed it.
pub fn verify_register(req: &pb::RegisterRequest, now_ms: i64) -> Result<PeerId, ProofError> {
    if req.public_key.is_empty() || req.signature.is_empty() {
        return Err(ProofError::Missing);
    }
    if req.public_key.len() > MAX_KEY_BYTES || req.signature.len() > MAX_KEY_BYTES {
        return Err(ProofError::BadKey("too long".into()));
    }
    let key = PublicKey::try_decode_protobuf(&req.public_key)
        .map_err(|e| ProofError::BadKey(e.to_string()))?;
    let skew = now_ms.saturating_sub(req.signed_at_ms);
    if skew.abs() > MAX_CLOCK_SKEW_MS {
        return Err(ProofError::Skew {
            signed_at_ms: req.signed_at_ms,
            skew_s: skew / 1000,
        });
    }
    if !key.verify(&payload(&req.agent_id, req.signed_at_ms), &req.signature) {
        return Err(ProofError::BadSignature);
    }
    let peer = key.to_peer_id();
    if !req.peer_id.is_empty() && req.peer_id != peer.to_string() {
        return Err(ProofError::PeerMismatch {
            claimed: req.peer_id.chars().take(80).collect(),
            actual: peer.to_string(),
        });
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(id: &str, key: &Keypair, at: i64) -> pb::RegisterRequest {
        let mut req = pb::RegisterRequest {
            agent_id: id.into(),
            ..Default::default()
        };
        sign_register(&mut req, key, at);
        req
    }

    #[test]
    fn a_signed_request_verifies_and_names_its_key() {
        let key = Keypair::generate_ed25519();
        let req = signed("a1", &key, 1_000_000);
        assert_eq!(
            verify_register(&req, 1_000_500),
            Ok(key.public().to_peer_id())
        );
    }

    #[test]
    fn changed_ids_times_keys_and_peers_are_refused() {
        let key = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let req = signed("a1", &key, 1_000_000);

        let mut renamed = req.clone();
        renamed.agent_id = "a2".into();
        assert_eq!(
            verify_register(&renamed, 1_000_000),
            Err(ProofError::BadSignature)
        );
        let mut retimed = req.clone();
        retimed.signed_at_ms += 1;
        assert_eq!(
            verify_register(&retimed, 1_000_000),
            Err(ProofError::BadSignature)
        );
        let mut rekeyed = req.clone();
        rekeyed.public_key = other.public().encode_protobuf();
        assert_eq!(
            verify_register(&rekeyed, 1_000_000),
            Err(ProofError::BadSignature)
        );
        let mut repeered = req.clone();
        repeered.peer_id = other.public().to_peer_id().to_string();
        assert!(matches!(
            verify_register(&repeered, 1_000_000),
            Err(ProofError::PeerMismatch { .. })
        ));
        assert!(matches!(
            verify_register(&req, 1_000_000 + MAX_CLOCK_SKEW_MS + 1),
            Err(ProofError::Skew { .. })
        ));
        let mut bare = req.clone();
        bare.signature.clear();
        assert_eq!(verify_register(&bare, 1_000_000), Err(ProofError::Missing));
        let mut junk = req;
        junk.public_key = b"junk".to_vec();
        assert!(matches!(
            verify_register(&junk, 1_000_000),
            Err(ProofError::BadKey(_))
        ));
    }
}
