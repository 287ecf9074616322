//! zstd on the wire, per chunk (peers' `/arcade/chunks/1` and the coordinator's
//! `DownloadPlugin`).
//!
//! - **Negotiated:** a requester asks with `accept_zstd`; a sender compresses only when
//!   asked, so old peers and coordinators (which neither ask nor know the field) keep
//!   exchanging raw chunks. The answer says how its bytes are encoded (`ChunkEncoding`).
//! - **Only when it pays:** a chunk goes compressed only when it shrinks to at most 7/8 of
//!   its size. A sender learns per content: after [`GIVE_UP_AFTER`] chunks that did not
//!   shrink, and none that did, it stops trying that content, so incompressible content
//!   costs a few trial compressions, not one per chunk.
//! - **Verified as raw bytes:** BLAKE3 (per chunk) and SHA-256 (whole) stay over the raw
//!   bytes; compression changes nothing the manifest says.
//! - **Bounded:** the receiver knows the chunk's length from its manifest and
//!   decompresses into exactly that much: a frame that declares, or produces, more (a
//!   decompression bomb) or less is refused before any larger allocation.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ContentId;

/// Default zstd level of the coordinator (`zstd -3`, the library's default): it sends
/// about one copy of each plugin, so a few percent fewer bytes are worth the CPU.
pub const DEFAULT_LEVEL: i32 = 3;
/// Default zstd level of peers: every holder compresses every chunk it sends, so the
/// fleet pays the CPU many times over (level 3 cost a 23 MiB executable's 8-agent
/// fleet 23.6–25.9 CPU s/GiB against 14.2–14.6 at level 1, for 0.43 instead of 0.48 of
/// the bytes).
pub const MESH_LEVEL: i32 = 1;
/// Highest level accepted in configuration (levels above 19 need a window larger than
/// chunks warrant).
pub const MAX_LEVEL: i32 = 19;
/// Chunks of one content tried without any gain before a sender stops trying it.
pub const GIVE_UP_AFTER: u32 = 4;
/// Contents whose verdict a sender remembers (the oldest are forgotten beyond this).
const MAX_VERDICTS: usize = 4096;

/// What a sender learned about one content.
#[derive(Debug, Default, Clone, Copy)]
struct Verdict {
    tried: u32,
    shrank: u32,
}

/// Compresses chunks for a sender that was asked to. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Compressor {
    level: i32,
    verdicts: Mutex<HashMap<ContentId, Verdict>>,
}

/// A compressed chunk could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    /// The frame is not valid zstd, or decodes to more than the chunk's length.
    #[error("compressed chunk is corrupt or larger than its {expected} bytes: {reason}")]
    Corrupt {
        /// The chunk's length from the manifest.
        expected: usize,
        /// What zstd said.
        reason: String,
    },
    /// The frame declares another size than the chunk's length.
    #[error("compressed chunk declares {declared} bytes, the manifest says {expected}")]
    WrongSize {
        /// Declared (or produced) size.
        declared: u64,
        /// The chunk's length from the manifest.
        expected: usize,
    },
}

impl Compressor {
    /// A compressor at zstd `level` (clamped to 1..=[`MAX_LEVEL`]).
    pub fn new(level: i32) -> Self {
        Self {
            level: level.clamp(1, MAX_LEVEL),
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// The zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Whether chunks of `content` are still worth trying.
    fn worth_trying(&self, content: &ContentId) -> bool {
        let verdicts = self.verdicts.lock().expect("verdict lock");
        verdicts
            .get(content)
            .is_none_or(|v| v.shrank > 0 || v.tried < GIVE_UP_AFTER)
    }

    fn learn(&self, content: &ContentId, shrank: bool) {
        let mut verdicts = self.verdicts.lock().expect("verdict lock");
        if verdicts.len() >= MAX_VERDICTS && !verdicts.contains_key(content) {
            verdicts.clear();
        }
        let v = verdicts.entry(*content).or_default();
        v.tried = v.tried.saturating_add(1);
        v.shrank = v.shrank.saturating_add(u32::from(shrank));
    }

    /// Chunk `data` of `content`, compressed, when that pays (at most 7/8 of its size);
    /// `None` to send it raw. CPU-bound: call it off the async workers.
    pub fn compress(&self, content: &ContentId, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < 64 || !self.worth_trying(content) {
            return None;
        }
        let packed = zstd::bulk::compress(data, self.level).ok();
        let pays = packed
            .as_ref()
            .is_some_and(|p| p.len() <= data.len() - data.len() / 8);
        self.learn(content, pays);
        packed.filter(|_| pays)
    }
}

/// Decompresses a chunk that must be exactly `expected` bytes long (its manifest
/// length), allocating no more than that.
pub fn decompress(data: &[u8], expected: usize) -> Result<bytes::Bytes, DecompressError> {
    let corrupt = |reason: String| DecompressError::Corrupt { expected, reason };
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(declared)) if declared != expected as u64 => {
            return Err(DecompressError::WrongSize { declared, expected });
        }
        Ok(_) => {}
        Err(e) => return Err(corrupt(format!("{e:?}"))),
    }
    let out = zstd::bulk::decompress(data, expected).map_err(|e| corrupt(e.to_string()))?;
    if out.len() != expected {
        return Err(DecompressError::WrongSize {
            declared: out.len() as u64,
            expected,
        });
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"abcabcabd"[i % 9]).collect()
    }

    fn noise(len: usize) -> Vec<u8> {
        crate::test_noise(len, 1)
    }

    #[test]
    fn compressible_chunks_round_trip() {
        let c = Compressor::new(DEFAULT_LEVEL);
        let id = ContentId::of_bytes(b"a");
        let raw = text(64 * 1024);
        let packed = c.compress(&id, &raw).expect("text compresses");
        assert!(packed.len() < raw.len() / 10);
        assert_eq!(decompress(&packed, raw.len()).unwrap(), raw);
    }

    #[test]
    fn incompressible_content_is_given_up_after_a_few_chunks() {
        let c = Compressor::new(DEFAULT_LEVEL);
        let id = ContentId::of_bytes(b"noise");
        for _ in 0..GIVE_UP_AFTER {
            assert!(c.compress(&id, &noise(4096)).is_none());
        }
        assert!(!c.worth_trying(&id));
        // Another content is still tried.
        assert!(
            c.compress(&ContentId::of_bytes(b"b"), &text(4096))
                .is_some()
        );
    }

    #[test]
    fn bombs_and_garbage_are_refused() {
        let c = Compressor::new(DEFAULT_LEVEL);
        let id = ContentId::of_bytes(b"bomb");
        let big = vec![0u8; 1 << 20];
        let packed = c.compress(&id, &big).unwrap();
        // Declares 1 MiB where the manifest says 64 KiB.
        assert!(matches!(
            decompress(&packed, 64 * 1024),
            Err(DecompressError::WrongSize { .. })
        ));
        // A frame without a declared size that produces more than expected.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &big).unwrap();
        let undeclared = enc.finish().unwrap();
        assert!(decompress(&undeclared, 64 * 1024).is_err());
        // Shorter than the manifest says.
        assert!(decompress(&packed, 2 << 20).is_err());
        assert!(decompress(b"not zstd at all", 100).is_err());
        assert!(decompress(&[], 100).is_err());
    }
}
