//! The agent's long-lived key: its identity at the coordinator (every `Register` is
//! signed with it, `arcade_p2p::identity`) and its libp2p peer id. Kept in
//! `<base_dir>/mesh-identity.key` (mode 0600), created on first start; losing it means
//! the coordinator no longer recognises the agent id until an admin removes the old
//! agent (`arcadectl agent remove ID`).

use std::path::Path;

use libp2p_identity::Keypair;

/// The key in `path`, created (mode 0600) when there is none.
pub fn load_or_create(path: &Path) -> std::io::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(std::io::Error::other)?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let first = load_or_create(&path).unwrap().public().to_peer_id();
        let again = load_or_create(&path).unwrap().public().to_peer_id();
        assert_eq!(first, again);
        std::fs::write(&path, b"junk").unwrap();
        assert!(load_or_create(&path).is_err());
    }
}
