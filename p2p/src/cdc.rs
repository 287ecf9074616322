//! Content-defined chunking (FastCDC: a gear rolling hash with normalised chunking).
//!
//! Fixed-size chunks of two versions share nothing once bytes are inserted or removed
//! early in the file (every later offset moves); content-defined chunk boundaries
//! depend only on the bytes around them, so they move with the content and the chunks
//! between edits stay identical. Chunks are at least `min`, at most `max` bytes, and
//! `avg` on average: below `avg` a boundary needs a harder condition (two more hash
//! bits), past it an easier one (two fewer), which narrows the spread of sizes (the
//! "normalised chunking" of FastCDC, Xia et al., USENIX ATC 2016).
//!
//! Manifests built with [`crate::manifest::ManifestBuilder::content_defined`] cut
//! content this way (`arcadectl plugin push --chunking cdc`); `arcade-sim bench-delta`
//! measures how much of a new version such chunks let an agent reuse.

/// Chunk size bounds, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcParams {
    /// Smallest chunk (except the last).
    pub min: usize,
    /// Average chunk: a power of two.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
}

impl CdcParams {
    /// 4 KiB / 16 KiB / 64 KiB.
    pub const DEFAULT: CdcParams = CdcParams {
        min: 4 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };

    /// `avg` with `min = avg / 4` and `max = avg × 4` (the default's proportions).
    pub const fn around(avg: usize) -> CdcParams {
        CdcParams {
            min: avg / 4,
            avg,
            max: avg * 4,
        }
    }

    /// Checks `min ≤ avg ≤ max`, `avg` a power of two of at least 256 bytes.
    pub fn check(&self) -> Result<(), String> {
        if !self.avg.is_power_of_two() || self.avg < 256 {
            return Err(format!(
                "average chunk {} must be a power of two of at least 256",
                self.avg
            ));
        }
        if self.min == 0 || self.min > self.avg || self.avg > self.max {
            return Err(format!(
                "chunk sizes must satisfy 0 < min ({}) <= avg ({}) <= max ({})",
                self.min, self.avg, self.max
            ));
        }
        Ok(())
    }
}

/// Parses a chunking choice: `fixed` (None), `cdc` ([`CdcParams::DEFAULT`]) or
/// `cdc:AVG` ([`CdcParams::around`] a size such as `64KiB`), checked for manifests
/// ([`crate::manifest::check_cdc_params`]).
pub fn parse_chunking(s: &str) -> Result<Option<CdcParams>, String> {
    let params = match s {
        "fixed" => return Ok(None),
        "cdc" => CdcParams::DEFAULT,
        _ => {
            let avg = s.strip_prefix("cdc:").ok_or_else(|| {
                format!("{s:?} is not a chunking: use fixed, cdc or cdc:AVG (e.g. cdc:64KiB)")
            })?;
            let avg = crate::settings::ByteSize::parse(avg)?.bytes();
            CdcParams::around(usize::try_from(avg).map_err(|_| format!("{avg} is too large"))?)
        }
    };
    crate::manifest::check_cdc_params(&params).map_err(|e| e.to_string())?;
    Ok(Some(params))
}

/// The gear table: 256 pseudo-random 64-bit values (splitmix64 from a fixed seed), the
/// same everywhere so that every party cuts at the same places.
const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x6172_6361_6465_2d63; // "arcade-c"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};

/// A mask of the `bits` highest bits (the gear hash shifts left, so its high bits
/// depend on the most bytes).
const fn high_bits(bits: u32) -> u64 {
    if bits == 0 { 0 } else { !0u64 << (64 - bits) }
}

/// The end offset of the chunk that starts at `data[0]`. It depends only on the first
/// `p.max` bytes: a stream cut `max` bytes at a time cuts where [`chunks`] does.
pub fn cut(data: &[u8], p: &CdcParams) -> usize {
    if data.len() <= p.min {
        return data.len();
    }
    let bits = p.avg.trailing_zeros();
    let (hard, easy) = (high_bits(bits + 2), high_bits(bits.saturating_sub(2)));
    let end = data.len().min(p.max);
    let normal = p.avg.min(end);
    let mut hash = 0u64;
    let mut i = p.min;
    while i < normal {
        hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
        if hash & hard == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < end {
        hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
        if hash & easy == 0 {
            return i + 1;
        }
        i += 1;
    }
    end
}

/// The chunks of `data` as `(offset, length)`, in order, covering it exactly.
pub fn chunks(data: &[u8], p: &CdcParams) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(data.len() / p.avg + 1);
    let mut at = 0;
    while at < data.len() {
        let len = cut(&data[at..], p);
        out.push((at, len));
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_noise as noise;

    #[test]
    fn chunks_cover_the_data_within_bounds() {
        let data = noise(1 << 20, 4);
        let p = CdcParams::DEFAULT;
        let c = chunks(&data, &p);
        assert_eq!(c.iter().map(|&(_, l)| l).sum::<usize>(), data.len());
        let mut at = 0;
        for (i, &(off, len)) in c.iter().enumerate() {
            assert_eq!(off, at);
            assert!(len <= p.max);
            assert!(len >= p.min || i == c.len() - 1);
            at += len;
        }
        // Normalised chunking keeps the average near `avg`.
        let avg = data.len() / c.len();
        assert!((p.avg / 2..p.avg * 2).contains(&avg), "average {avg}");
        assert!(chunks(&[], &p).is_empty());
        assert_eq!(chunks(&data[..100], &p), vec![(0, 100)]);
    }

    #[test]
    fn boundaries_move_with_the_content() {
        let base = noise(1 << 20, 5);
        let mut edited = base[..10_000].to_vec();
        edited.extend_from_slice(&noise(777, 6));
        edited.extend_from_slice(&base[10_000..]);
        let p = CdcParams::DEFAULT;
        let have: std::collections::HashSet<&[u8]> = chunks(&base, &p)
            .iter()
            .map(|&(o, l)| &base[o..o + l])
            .collect();
        let reused: usize = chunks(&edited, &p)
            .iter()
            .filter(|&&(o, l)| have.contains(&edited[o..o + l]))
            .map(|&(_, l)| l)
            .sum();
        // All but the chunks around the insertion are the same bytes.
        assert!(
            reused as f64 > 0.9 * base.len() as f64,
            "{reused} of {} bytes reused",
            edited.len()
        );
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(CdcParams::DEFAULT.check().is_ok());
        for p in [
            CdcParams {
                min: 0,
                avg: 1024,
                max: 4096,
            },
            CdcParams {
                min: 1024,
                avg: 1000,
                max: 4096,
            },
            CdcParams {
                min: 4096,
                avg: 2048,
                max: 8192,
            },
            CdcParams {
                min: 64,
                avg: 128,
                max: 256,
            },
            CdcParams {
                min: 1024,
                avg: 4096,
                max: 2048,
            },
        ] {
            assert!(p.check().is_err(), "{p:?}");
        }
    }
}
