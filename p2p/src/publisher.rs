//! Publisher signatures: who published a plugin version, checked by agents against keys
//! they were configured with — not against anything the coordinator says, so a
//! compromised coordinator or storage cannot make an agent run content no trusted
//! publisher signed.
//!
//! What is signed: a domain tag, the plugin id, the version, the content's SHA-256 and
//! its size ([`statement`]). That is what an agent loads by: every chunk is checked
//! against the manifest's BLAKE3 and the whole file against that SHA-256 before it is
//! published, so a manifest whose chunk list was altered cannot yield other bytes —
//! and a signed statement cannot be moved to another id, version or content.
//!
//! Keys are ed25519 (`arcadectl key generate`); a public key is written
//! `ed25519:<64 hex digits>`.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use libp2p_identity::{Keypair, ed25519};

use crate::ContentId;

const DOMAIN: &[u8] = b"arcade-plugin-signature-v1\0";
const PREFIX: &str = "ed25519:";

/// A signature or key that cannot be used, or a signing policy that refuses a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not `ed25519:` and 64 hex digits, or not 32 bytes.
    #[error("publisher key {0:?} is not ed25519:<64 hex digits>")]
    BadKey(String),
    /// The signature does not verify under the key it names.
    #[error("the signature by {0} does not match this plugin's id, version and content")]
    BadSignature(PublisherId),
    /// Unsigned, and the policy requires a signature.
    #[error("the plugin is not signed, and a publisher signature is required")]
    Unsigned,
    /// Signed by a key the policy does not list, and a signature is required.
    #[error("the plugin is signed by {0}, which is not a trusted publisher key")]
    UnknownSigner(PublisherId),
    /// A key file that cannot be read or written.
    #[error("publisher key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A publisher's public key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublisherId([u8; 32]);

impl PublisherId {
    /// From the 32 raw bytes carried with a plugin.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignatureError> {
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SignatureError::BadKey(format!("{} bytes", bytes.len())))?;
        ed25519::PublicKey::try_from_bytes(&raw)
            .map_err(|_| SignatureError::BadKey(hex::encode(raw)))?;
        Ok(Self(raw))
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `signature` is this key's over `statement`.
    pub fn verifies(&self, statement: &[u8], signature: &[u8]) -> bool {
        ed25519::PublicKey::try_from_bytes(&self.0).is_ok_and(|k| k.verify(statement, signature))
    }
}

impl fmt::Display for PublisherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PublisherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublisherId {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SignatureError::BadKey(s.chars().take(80).collect());
        let hex_part = s.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        Self::from_bytes(&bytes).map_err(|_| bad())
    }
}

/// The bytes a publisher signs for `id@version` with content `sha256` of `size` bytes.
pub fn statement(id: &str, version: &str, sha256: &ContentId, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + id.len() + version.len() + 48);
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(id.as_bytes());
    out.push(0);
    out.extend_from_slice(version.as_bytes());
    out.push(0);
    out.extend_from_slice(sha256.as_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

/// A publisher's signing key.
pub struct PublisherKey(ed25519::Keypair);

impl PublisherKey {
    /// A fresh key.
    pub fn generate() -> Self {
        Self(ed25519::Keypair::generate())
    }

    /// Its public half.
    pub fn id(&self) -> PublisherId {
        PublisherId(self.0.public().to_bytes())
    }

    /// Signs `statement` ([`statement`]).
    pub fn sign(&self, statement: &[u8]) -> Vec<u8> {
        self.0.sign(statement)
    }

    /// Reads a key file written by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self, SignatureError> {
        let bad = |reason: String| SignatureError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let key = Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| bad(format!("not a key file: {e}")))?
            .try_into_ed25519()
            .map_err(|_| bad("not an ed25519 key".into()))?;
        Ok(Self(key))
    }

    /// Writes the key to a new file readable by its owner only; an existing file is
    /// never overwritten.
    pub fn save(&self, path: &Path) -> Result<(), SignatureError> {
        use std::io::Write as _;
        let bad = |reason: String| SignatureError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes = Keypair::from(self.0.clone())
            .to_protobuf_encoding()
            .map_err(|e| bad(e.to_string()))?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| bad(e.to_string()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| bad(e.to_string()))
    }
}

/// Which publishers an agent trusts, and which plugins it runs only signed.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    keys: HashSet<PublisherId>,
    require: bool,
    require_for: Vec<String>,
}

impl TrustPolicy {
    /// `keys` as written in configuration (`ed25519:<hex>`); `require`: every plugin
    /// must be signed by one of them (see also [`Self::require_for`]).
    pub fn new<'a>(
        keys: impl IntoIterator<Item = &'a str>,
        require: bool,
    ) -> Result<Self, SignatureError> {
        Ok(Self {
            keys: keys.into_iter().map(str::parse).collect::<Result<_, _>>()?,
            require,
            require_for: Vec::new(),
        })
    }

    /// Also requires signatures for plugin ids starting with any of `prefixes`.
    pub fn require_for(mut self, prefixes: impl IntoIterator<Item = String>) -> Self {
        self.require_for.extend(prefixes);
        self
    }

    /// Whether plugin `id` must be signed by a trusted key.
    pub fn requires_signature(&self, id: &str) -> bool {
        self.require || self.require_for.iter().any(|p| id.starts_with(p.as_str()))
    }

    /// Checks plugin `id`'s signature. `Ok(Some(key))`: signed by a trusted key.
    /// `Ok(None)`: unsigned or signed by an unknown key, and `id` needs no signature.
    /// A signature by a trusted key that does not verify is refused whatever the policy.
    pub fn check(
        &self,
        id: &str,
        signer: &[u8],
        signature: &[u8],
        statement: &[u8],
    ) -> Result<Option<PublisherId>, SignatureError> {
        let require = self.requires_signature(id);
        if signer.is_empty() && signature.is_empty() {
            return if require {
                Err(SignatureError::Unsigned)
            } else {
                Ok(None)
            };
        }
        let key = PublisherId::from_bytes(signer)?;
        if !self.keys.contains(&key) {
            return if require {
                Err(SignatureError::UnknownSigner(key))
            } else {
                Ok(None)
            };
        }
        if key.verifies(statement, signature) {
            Ok(Some(key))
        } else {
            Err(SignatureError::BadSignature(key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(version: &str, content: &[u8]) -> Vec<u8> {
        statement(
            "notify/x",
            version,
            &ContentId::of_bytes(content),
            content.len() as u64,
        )
    }

    #[test]
    fn a_trusted_signature_verifies_and_any_change_breaks_it() {
        let key = PublisherKey::generate();
        let signed = stmt("1.0.0", b"abc");
        let sig = key.sign(&signed);
        let id = key.id();
        let policy = TrustPolicy::new([id.to_string().as_str()], true).unwrap();
        assert_eq!(
            policy
                .check("notify/x", id.as_bytes(), &sig, &signed)
                .unwrap(),
            Some(id.clone())
        );
        for other in [
            stmt("1.0.1", b"abc"),
            stmt("1.0.0", b"abd"),
            stmt("1.0.0", b"abcd"),
            statement("notify/y", "1.0.0", &ContentId::of_bytes(b"abc"), 3),
        ] {
            assert_eq!(
                policy.check("notify/x", id.as_bytes(), &sig, &other),
                Err(SignatureError::BadSignature(id.clone()))
            );
        }
        // Refused even when signatures are optional: the key is trusted, the bytes lie.
        let lenient = TrustPolicy::new([id.to_string().as_str()], false).unwrap();
        assert!(
            lenient
                .check("notify/x", id.as_bytes(), &sig, &stmt("2.0.0", b"abc"))
                .is_err()
        );
    }

    #[test]
    fn unsigned_and_unknown_signers_are_refused_only_when_required() {
        let trusted = PublisherKey::generate();
        let stranger = PublisherKey::generate();
        let signed = stmt("1.0.0", b"abc");
        let required = TrustPolicy::new([trusted.id().to_string().as_str()], true).unwrap();
        let optional = TrustPolicy::new([trusted.id().to_string().as_str()], false).unwrap();
        assert_eq!(
            required.check("notify/x", &[], &[], &signed),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(optional.check("notify/x", &[], &[], &signed), Ok(None));
        let sig = stranger.sign(&signed);
        assert_eq!(
            required.check("notify/x", stranger.id().as_bytes(), &sig, &signed),
            Err(SignatureError::UnknownSigner(stranger.id()))
        );
        assert_eq!(
            optional.check("notify/x", stranger.id().as_bytes(), &sig, &signed),
            Ok(None)
        );
        assert!(matches!(
            required.check("notify/x", &[1, 2, 3], &sig, &signed),
            Err(SignatureError::BadKey(_))
        ));
        // Required for some ids only.
        let prefixed = optional.clone().require_for(["deploy/".to_owned()]);
        assert_eq!(
            prefixed.check("deploy/prod", &[], &[], &signed),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(prefixed.check("notify/x", &[], &[], &signed), Ok(None));
        assert!(prefixed.requires_signature("deploy/x"));
        assert!(!prefixed.requires_signature("deployx"));
    }

    #[test]
    fn keys_round_trip_through_text_and_files() {
        let key = PublisherKey::generate();
        let text = key.id().to_string();
        assert!(
            text.starts_with("ed25519:") && text.len() == 8 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<PublisherId>().unwrap(), key.id());
        for bad in ["", "ed25519:", "ed25519:zz", "rsa:00", &text[..20]] {
            assert!(bad.parse::<PublisherId>().is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        key.save(&path).unwrap();
        assert_eq!(PublisherKey::load(&path).unwrap().id(), key.id());
        assert!(
            key.save(&path).is_err(),
            "an existing key file is overwritten"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("junk"), b"junk").unwrap();
        assert!(PublisherKey::load(&dir.path().join("junk")).is_err());
    }
}
