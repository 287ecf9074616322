//! Bytes a version bump costs, for a real pair of files (old → new): the whole new
//! version raw, zstd-compressed whole, zstd per chunk as the wire sends it
//! (`arcade_p2p::compress`), the share of fixed-size and of content-defined chunks
//! (`arcade_p2p::cdc`) the old version already has (what chunk dedup alone would
//! reuse), and patches (`arcade_p2p::delta`) at two
//! levels with their build and apply times. Every patch is applied and compared with
//! the new version before its figures count.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use arcade_p2p::ContentId;
use arcade_p2p::compress::Compressor;
use serde::Serialize;

/// What to compare.
#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// The old version (the base an agent holds).
    pub base: PathBuf,
    /// The new version.
    pub target: PathBuf,
    /// Patch levels to build.
    pub levels: Vec<i32>,
    /// Content-defined chunkings to measure (`cdc`, `cdc:AVG`, as `plugin push
    /// --chunking`).
    pub chunkings: Vec<String>,
}

/// What content-defined chunks with one set of bounds reuse.
#[derive(Debug, Clone, Serialize)]
pub struct CdcFigure {
    /// As given (`cdc`, `cdc:64KiB`).
    pub chunking: String,
    /// Chunks of the new version.
    pub chunks: usize,
    /// Share of the new version's bytes in chunks the old version also has.
    pub shared: f64,
    /// The chunks the old version lacks, zstd-compressed one by one: what an agent
    /// holding the old version fetches with CDC manifests and compression.
    pub missing_zstd_bytes: u64,
    pub missing_zstd_ratio: f64,
}

/// One patch.
#[derive(Debug, Clone, Serialize)]
pub struct PatchFigure {
    pub level: i32,
    pub bytes: u64,
    /// `bytes ÷` the new version's size.
    pub ratio: f64,
    pub build_s: f64,
    pub apply_s: f64,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct DeltaFigures {
    pub base: String,
    pub target: String,
    pub base_bytes: u64,
    pub target_bytes: u64,
    /// zstd -3 of the whole new version.
    pub zstd3_whole_bytes: u64,
    pub zstd3_whole_ratio: f64,
    /// The wire's per-chunk zstd (level 3, 1 MiB chunks; raw where it does not pay).
    pub zstd3_chunked_bytes: u64,
    pub zstd3_chunked_ratio: f64,
    /// Share of the new version's bytes in fixed-size chunks the old version also has.
    pub shared_1mib_chunks: f64,
    pub shared_64kib_chunks: f64,
    /// Content-defined chunks, per chunking asked for.
    pub cdc: Vec<CdcFigure>,
    pub patches: Vec<PatchFigure>,
}

/// (chunks of `target`, share of it in CDC chunks `base` also has, zstd bytes of the
/// others).
fn cdc(base: &[u8], target: &[u8], p: &arcade_p2p::cdc::CdcParams) -> (usize, f64, u64) {
    use arcade_p2p::cdc::chunks;
    let have: HashSet<[u8; 32]> = chunks(base, p)
        .iter()
        .map(|&(o, l)| *blake3::hash(&base[o..o + l]).as_bytes())
        .collect();
    let (mut reused, mut missing) = (0usize, 0u64);
    let cut = chunks(target, p);
    for &(o, l) in &cut {
        let c = &target[o..o + l];
        if have.contains(blake3::hash(c).as_bytes()) {
            reused += l;
        } else {
            missing += zstd::bulk::compress(c, 3).map_or(l, |z| z.len().min(l)) as u64;
        }
    }
    (
        cut.len(),
        reused as f64 / target.len().max(1) as f64,
        missing,
    )
}

fn shared(base: &[u8], target: &[u8], chunk: usize) -> f64 {
    let have: HashSet<[u8; 32]> = base
        .chunks(chunk)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    let reused: usize = target
        .chunks(chunk)
        .filter(|c| have.contains(blake3::hash(c).as_bytes()))
        .map(<[u8]>::len)
        .sum();
    reused as f64 / target.len().max(1) as f64
}

/// Measures one pair.
pub fn run(opts: &DeltaOptions) -> anyhow::Result<DeltaFigures> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
    };
    let (base, target) = (read(&opts.base)?, read(&opts.target)?);
    let len = target.len() as u64;
    let ratio = |n: u64| n as f64 / len.max(1) as f64;
    let whole = zstd::bulk::compress(&target, 3)?.len() as u64;
    let wire = Compressor::new(3);
    let id = ContentId::of_bytes(&target);
    let chunked: u64 = target
        .chunks(1 << 20)
        .map(|c| wire.compress(&id, c).map_or(c.len(), |p| p.len()) as u64)
        .sum();
    let mut cdc_figures = Vec::new();
    for chunking in &opts.chunkings {
        let p = arcade_p2p::cdc::parse_chunking(chunking)
            .map_err(|e| anyhow::anyhow!("--chunking {chunking}: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("--chunking lists content-defined chunkings only"))?;
        let (chunks, shared, missing) = cdc(&base, &target, &p);
        cdc_figures.push(CdcFigure {
            chunking: chunking.clone(),
            chunks,
            shared,
            missing_zstd_bytes: missing,
            missing_zstd_ratio: ratio(missing),
        });
    }
    let mut patches = Vec::new();
    for &level in &opts.levels {
        let t = Instant::now();
        let patch = arcade_p2p::delta::make_patch(&base, &target, level)?;
        let build_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut out = Vec::with_capacity(target.len());
        let window = arcade_p2p::delta::window_log_for(base.len() as u64, len);
        arcade_p2p::delta::apply_patch(&base, &patch, &mut out, len, window)?;
        let apply_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            out == target,
            "the level-{level} patch does not rebuild the target"
        );
        patches.push(PatchFigure {
            level,
            bytes: patch.len() as u64,
            ratio: ratio(patch.len() as u64),
            build_s,
            apply_s,
        });
    }
    Ok(DeltaFigures {
        base: opts.base.display().to_string(),
        target: opts.target.display().to_string(),
        base_bytes: base.len() as u64,
        target_bytes: len,
        zstd3_whole_bytes: whole,
        zstd3_whole_ratio: ratio(whole),
        zstd3_chunked_bytes: chunked,
        zstd3_chunked_ratio: ratio(chunked),
        shared_1mib_chunks: shared(&base, &target, 1 << 20),
        shared_64kib_chunks: shared(&base, &target, 64 << 10),
        cdc: cdc_figures,
        patches,
    })
}
