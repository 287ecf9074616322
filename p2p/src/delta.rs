//! Patches between versions of a plugin: the new version compressed with zstd against
//! the old one as a reference prefix (what `zstd --patch-from OLD NEW` does), with
//! long-distance matching and a window that covers both.
//!
//! Fixed-size chunks of two consecutive releases of a native executable share almost
//! nothing (every offset moves), so chunk dedup alone does not make binary deltas;
//! a patch does. Applying one needs the base in memory (or mapped) and a decoder window
//! of at most [`window_log_for`] of both sizes, which a receiver bounds with
//! `max_window_log`; the result is streamed out and is bounded by the length it must
//! have. The caller verifies the result's SHA-256 before using it.

use std::io::{self, Read, Write};

/// Smallest and largest window (log2 bytes) a patch uses: 1 KiB to 2 GiB.
pub const MIN_WINDOW_LOG: u32 = 10;
/// See [`MIN_WINDOW_LOG`].
pub const MAX_WINDOW_LOG: u32 = 31;

/// A patch cannot be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// zstd or the I/O around it failed (a corrupt patch, the wrong base, a window
    /// larger than allowed).
    #[error("patch: {0}")]
    Zstd(#[from] io::Error),
    /// The patch yields another length than the target's.
    #[error("patch yields {got} bytes or more where the target has {expected}")]
    WrongLength {
        /// Bytes produced (or read before stopping).
        got: u64,
        /// The target's length.
        expected: u64,
    },
    /// Base and target together need a larger window than patches use.
    #[error("base and target ({0} bytes) exceed the largest patch window (2 GiB)")]
    TooLarge(u64),
}

/// The window (log2 bytes) a patch from a `base_len` base to a `target_len` target
/// uses: the smallest power of two that holds both.
pub fn window_log_for(base_len: u64, target_len: u64) -> u32 {
    let both = base_len.saturating_add(target_len).max(1);
    (64 - (both - 1).leading_zeros()).clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG)
}

/// The size of `data` compressed whole at zstd `level` (what a patch must beat).
pub fn compressed_size(data: &[u8], level: i32) -> io::Result<u64> {
    Ok(zstd::bulk::compress(data, level)?.len() as u64)
}

/// A patch that turns `base` into `target` at zstd `level`. CPU-bound (level 3 takes
/// about as long as compressing `target`; level 19 tens of times longer).
pub fn make_patch(base: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>, PatchError> {
    let both = base.len() as u64 + target.len() as u64;
    if both > 1 << MAX_WINDOW_LOG {
        return Err(PatchError::TooLarge(both));
    }
    let mut enc = zstd::stream::Encoder::with_ref_prefix(Vec::new(), level, base)?;
    enc.window_log(window_log_for(base.len() as u64, target.len() as u64))?;
    enc.long_distance_matching(true)?;
    enc.include_contentsize(true)?;
    enc.set_pledged_src_size(Some(target.len() as u64))?;
    enc.write_all(target)?;
    Ok(enc.finish()?)
}

/// Applies `patch` to `base`, writing the target (`expected_len` bytes) to `out`. The
/// decoder's window is limited to `max_window_log`; a patch that yields more or fewer
/// bytes fails. Returns the bytes written.
pub fn apply_patch(
    base: &[u8],
    patch: &[u8],
    out: &mut impl Write,
    expected_len: u64,
    max_window_log: u32,
) -> Result<u64, PatchError> {
    let mut dec = zstd::stream::Decoder::with_ref_prefix(patch, base)?;
    dec.window_log_max(max_window_log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG))?;
    let mut limited = dec.take(expected_len + 1);
    let mut buf = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > expected_len {
            return Err(PatchError::WrongLength {
                got: written,
                expected: expected_len,
            });
        }
        out.write_all(&buf[..n])?;
    }
    if written != expected_len {
        return Err(PatchError::WrongLength {
            got: written,
            expected: expected_len,
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_noise as noise;

    /// A "release" whose bytes shift: an insertion near the start and an edit later.
    fn next_release(base: &[u8]) -> Vec<u8> {
        let mut t = base[..1000].to_vec();
        t.extend_from_slice(&noise(777, 9));
        t.extend_from_slice(&base[1000..base.len() / 2]);
        t.extend_from_slice(&noise(5000, 11));
        t.extend_from_slice(&base[base.len() / 2 + 100..]);
        t
    }

    #[test]
    fn a_patch_of_shifted_bytes_is_small_and_applies_exactly() {
        let base = noise(2 << 20, 3);
        let target = next_release(&base);
        let patch = make_patch(&base, &target, 3).unwrap();
        assert!(
            patch.len() < target.len() / 50,
            "{} bytes of patch for {}",
            patch.len(),
            target.len()
        );
        let mut out = Vec::new();
        let n = apply_patch(&base, &patch, &mut out, target.len() as u64, 23).unwrap();
        assert_eq!(n, target.len() as u64);
        assert_eq!(out, target);
    }

    #[test]
    fn wrong_base_short_window_and_wrong_length_fail() {
        let base = noise(1 << 20, 3);
        let target = next_release(&base);
        let patch = make_patch(&base, &target, 3).unwrap();
        let len = target.len() as u64;
        // Another base yields other bytes (or fails): never the target.
        let other = noise(1 << 20, 5);
        let mut out = Vec::new();
        if apply_patch(&other, &patch, &mut out, len, 23).is_ok() {
            assert_ne!(out, target);
        }
        // A window smaller than the patch needs is refused.
        assert!(apply_patch(&base, &patch, &mut Vec::new(), len, 16).is_err());
        // The target's length is enforced both ways.
        assert!(matches!(
            apply_patch(&base, &patch, &mut Vec::new(), len - 1, 23),
            Err(PatchError::WrongLength { .. })
        ));
        assert!(matches!(
            apply_patch(&base, &patch, &mut Vec::new(), len + 1, 23),
            Err(PatchError::WrongLength { .. })
        ));
        assert!(apply_patch(&base, b"garbage", &mut Vec::new(), len, 23).is_err());
    }

    #[test]
    fn windows_cover_both_sizes() {
        assert_eq!(window_log_for(0, 0), MIN_WINDOW_LOG);
        assert_eq!(window_log_for(1 << 20, 1 << 20), 21);
        assert_eq!(window_log_for((1 << 20) + 1, 1 << 20), 22);
        assert_eq!(window_log_for(u64::MAX, 1), MAX_WINDOW_LOG);
    }
}
