//! Content manifests: the size, chunk layout, per-chunk BLAKE3 hashes and whole-content
//! SHA-256 of one stored content.
//!
//! Chunks are fixed-size (a power of two; the last may be shorter) or content-defined
//! ([`crate::cdc`], each chunk's length listed), where boundaries move with the bytes so
//! that an edit leaves the other chunks of a new version identical to the old one's.
//! Every user finds a chunk's bytes through [`Manifest::chunk_range`].
//!
//! A manifest is built in one streaming pass ([`ManifestBuilder`]), never holding the
//! content in memory (content-defined: at most `max` bytes plus the bytes fed). Content identity is the SHA-256 of the whole ([`ContentId`]).
//! Untrusted chunks are checked with [`Manifest::verify_chunk`]; a finished file with
//! [`verify_sha256`]. The protobuf encoding ([`Manifest::encode`]) is deterministic.

use std::fmt;
use std::io::{self, Read};
use std::ops::Range;
use std::str::FromStr;

use arcade_proto::v1 as pb;

use crate::cdc::{self, CdcParams};
use prost::Message as _;
use sha2::{Digest, Sha256};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest accepted chunk size (1 KiB).
pub const MIN_CHUNK_SIZE: u32 = 1 << 10;
/// Largest accepted chunk size (64 MiB): a chunk travels in one message.
pub const MAX_CHUNK_SIZE: u32 = 1 << 26;
/// Most chunks a manifest may list (keeps an encoded manifest under ~35 MB).
pub const MAX_CHUNKS: u64 = 1 << 20;

/// Identity of a content: the SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId([u8; 32]);

impl ContentId {
    /// Wraps a raw 32-byte SHA-256 digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// SHA-256 of an in-memory byte slice (for small inputs such as tests and tokens).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.to_hex())
    }
}

/// A string that is not a 64-character hex SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest: expected 64 hex characters, got {got:?}")]
pub struct ParseContentIdError {
    got: String,
}

impl FromStr for ContentId {
    type Err = ParseContentIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseContentIdError {
            got: s.chars().take(80).collect(),
        };
        if s.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.to_ascii_lowercase(), &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

/// A manifest that cannot be decoded or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a protobuf `Manifest`.
    #[error("manifest is not valid protobuf")]
    Decode(#[source] prost::DecodeError),
    /// The chunk size is not a power of two within bounds.
    #[error(
        "chunk size {0} is invalid: it must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
    )]
    ChunkSize(u64),
    /// A hash field does not have 32 bytes.
    #[error("{field} must be 32 bytes, got {len}")]
    HashLength {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The number of chunk hashes does not match size and chunk size.
    #[error("manifest lists {actual} chunk hashes but size and chunk size imply {expected}")]
    ChunkCount {
        /// Implied by size / chunk size.
        expected: u64,
        /// Listed.
        actual: u64,
    },
    /// Content-defined chunking that is inconsistent or out of bounds.
    #[error("content-defined chunks: {0}")]
    Cdc(String),
    /// More chunks than [`MAX_CHUNKS`].
    #[error(
        "content of {chunks} chunks exceeds the limit of {MAX_CHUNKS} chunks; use a larger chunk size"
    )]
    TooManyChunks {
        /// Chunks the content would need.
        chunks: u64,
    },
}

/// A chunk or a whole content that fails verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chunk index is past the last chunk.
    #[error("chunk {index} does not exist: the content has {chunks} chunks")]
    NoSuchChunk {
        /// Requested index.
        index: u64,
        /// Chunks in the content.
        chunks: u32,
    },
    /// The chunk has the wrong length.
    #[error("chunk {index} has {actual} bytes, expected {expected}")]
    ChunkLength {
        /// Chunk index.
        index: u32,
        /// Length from the manifest.
        expected: u64,
        /// Length received.
        actual: u64,
    },
    /// The chunk's BLAKE3 differs from the manifest.
    #[error("chunk {index} fails its BLAKE3 check")]
    ChunkHash {
        /// Chunk index.
        index: u32,
    },
    /// The whole content's SHA-256 differs.
    #[error("SHA-256 mismatch: expected {expected}, got {actual}")]
    Sha256 {
        /// Expected digest.
        expected: ContentId,
        /// Computed digest.
        actual: ContentId,
    },
    /// The whole content has the wrong size.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    Size {
        /// Expected size.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// Reading the content failed.
    #[error("reading content failed")]
    Io(#[source] io::Error),
}

/// Checks a chunk size: a power of two within [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(chunk_size: u64) -> Result<u32, ManifestError> {
    if chunk_size.is_power_of_two()
        && (u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size)
    {
        Ok(chunk_size as u32)
    } else {
        Err(ManifestError::ChunkSize(chunk_size))
    }
}

/// Number of chunks of a content of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// Checks content-defined chunking bounds for a manifest: [`CdcParams::check`], and
/// no chunk larger than [`MAX_CHUNK_SIZE`].
pub fn check_cdc_params(p: &CdcParams) -> Result<(), ManifestError> {
    p.check().map_err(ManifestError::Cdc)?;
    if p.max > MAX_CHUNK_SIZE as usize {
        return Err(ManifestError::Cdc(format!(
            "max chunk {} exceeds the limit of {MAX_CHUNK_SIZE} bytes",
            p.max
        )));
    }
    Ok(())
}

/// The bounds in their protobuf form.
pub fn cdc_to_proto(p: &CdcParams) -> pb::CdcParams {
    pb::CdcParams {
        min_size: p.min as u32,
        avg_size: p.avg as u32,
        max_size: p.max as u32,
    }
}

/// Checked bounds from their protobuf form.
pub fn cdc_from_proto(p: &pb::CdcParams) -> Result<CdcParams, ManifestError> {
    let params = CdcParams {
        min: p.min_size as usize,
        avg: p.avg_size as usize,
        max: p.max_size as usize,
    };
    check_cdc_params(&params)?;
    Ok(params)
}

/// Where the chunks of a content lie.
#[derive(Clone, PartialEq, Eq)]
enum Layout {
    /// Every chunk has `chunk_size` bytes but the last.
    Fixed(u32),
    /// Content-defined: the chunker's bounds and the chunks' start offsets followed by
    /// the size (one more entry than chunks).
    Cdc { params: CdcParams, starts: Vec<u64> },
}

/// The manifest of one content.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    size: u64,
    layout: Layout,
    sha256: ContentId,
    chunks: Vec<[u8; 32]>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("content", &self.sha256)
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size())
            .field("cdc", &self.cdc())
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl Manifest {
    /// Content identity (SHA-256 of the whole).
    pub fn content_id(&self) -> ContentId {
        self.sha256
    }

    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fixed-size chunks: their size in bytes. Content-defined chunks: 0.
    pub fn chunk_size(&self) -> u32 {
        match self.layout {
            Layout::Fixed(size) => size,
            Layout::Cdc { .. } => 0,
        }
    }

    /// The bounds of content-defined chunks (None: fixed-size chunks).
    pub fn cdc(&self) -> Option<&CdcParams> {
        match &self.layout {
            Layout::Fixed(_) => None,
            Layout::Cdc { params, .. } => Some(params),
        }
    }

    /// The most bytes one chunk can have (what a buffer for any chunk needs).
    pub fn max_chunk_len(&self) -> u32 {
        match &self.layout {
            Layout::Fixed(size) => *size,
            Layout::Cdc { params, .. } => params.max as u32,
        }
    }

    /// Number of chunks (0 for empty content).
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// The BLAKE3 hash of chunk `index`.
    pub fn chunk_hash(&self, index: u32) -> Option<&[u8; 32]> {
        self.chunks.get(index as usize)
    }

    /// Byte range of chunk `index` within the content.
    pub fn chunk_range(&self, index: u32) -> Option<Range<u64>> {
        if index as usize >= self.chunks.len() {
            return None;
        }
        match &self.layout {
            Layout::Fixed(size) => {
                let start = u64::from(index) * u64::from(*size);
                let end = (start + u64::from(*size)).min(self.size);
                Some(start..end)
            }
            Layout::Cdc { starts, .. } => Some(starts[index as usize]..starts[index as usize + 1]),
        }
    }

    /// Checks one chunk's length and BLAKE3 hash against the manifest.
    pub fn verify_chunk(&self, index: u32, data: &[u8]) -> Result<(), VerifyError> {
        let range = self.chunk_range(index).ok_or(VerifyError::NoSuchChunk {
            index: u64::from(index),
            chunks: self.chunk_count(),
        })?;
        let expected = range.end - range.start;
        if data.len() as u64 != expected {
            return Err(VerifyError::ChunkLength {
                index,
                expected,
                actual: data.len() as u64,
            });
        }
        if blake3::hash(data).as_bytes() != &self.chunks[index as usize] {
            return Err(VerifyError::ChunkHash { index });
        }
        Ok(())
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Manifest {
        let (cdc, chunk_lengths) = match &self.layout {
            Layout::Fixed(_) => (None, Vec::new()),
            Layout::Cdc { params, starts } => (
                Some(cdc_to_proto(params)),
                starts.windows(2).map(|w| (w[1] - w[0]) as u32).collect(),
            ),
        };
        pb::Manifest {
            size: self.size,
            chunk_size: self.chunk_size(),
            sha256: self.sha256.as_bytes().to_vec(),
            chunk_blake3: self.chunks.iter().map(|h| h.to_vec()).collect(),
            cdc,
            chunk_lengths,
        }
    }

    /// Validates and converts the protobuf form.
    pub fn from_proto(m: &pb::Manifest) -> Result<Self, ManifestError> {
        let sha256: [u8; 32] =
            m.sha256
                .as_slice()
                .try_into()
                .map_err(|_| ManifestError::HashLength {
                    field: "sha256",
                    len: m.sha256.len(),
                })?;
        let layout = match &m.cdc {
            None => {
                if !m.chunk_lengths.is_empty() {
                    return Err(ManifestError::Cdc(
                        "chunk lengths are listed but no chunking bounds are given".into(),
                    ));
                }
                let chunk_size = check_chunk_size(u64::from(m.chunk_size))?;
                let expected = chunk_count(m.size, chunk_size);
                if expected > MAX_CHUNKS {
                    return Err(ManifestError::TooManyChunks { chunks: expected });
                }
                if expected != m.chunk_blake3.len() as u64 {
                    return Err(ManifestError::ChunkCount {
                        expected,
                        actual: m.chunk_blake3.len() as u64,
                    });
                }
                Layout::Fixed(chunk_size)
            }
            Some(p) => {
                let params = cdc_from_proto(p)?;
                if m.chunk_size != 0 {
                    return Err(ManifestError::Cdc(format!(
                        "chunk_size must be 0, got {}",
                        m.chunk_size
                    )));
                }
                let count = m.chunk_lengths.len() as u64;
                if count > MAX_CHUNKS {
                    return Err(ManifestError::TooManyChunks { chunks: count });
                }
                if count != m.chunk_blake3.len() as u64 {
                    return Err(ManifestError::ChunkCount {
                        expected: count,
                        actual: m.chunk_blake3.len() as u64,
                    });
                }
                let mut starts = Vec::with_capacity(m.chunk_lengths.len() + 1);
                let mut at = 0u64;
                for (i, &len) in m.chunk_lengths.iter().enumerate() {
                    if len == 0 || len as usize > params.max {
                        return Err(ManifestError::Cdc(format!(
                            "chunk {i} has {len} bytes, outside 1..={}",
                            params.max
                        )));
                    }
                    starts.push(at);
                    at += u64::from(len);
                }
                starts.push(at);
                if at != m.size {
                    return Err(ManifestError::Cdc(format!(
                        "chunk lengths add up to {at} bytes, but the size is {}",
                        m.size
                    )));
                }
                Layout::Cdc { params, starts }
            }
        };
        let chunks = m
            .chunk_blake3
            .iter()
            .map(|h| {
                h.as_slice()
                    .try_into()
                    .map_err(|_| ManifestError::HashLength {
                        field: "chunk_blake3",
                        len: h.len(),
                    })
            })
            .collect::<Result<Vec<[u8; 32]>, _>>()?;
        Ok(Self {
            size: m.size,
            layout,
            sha256: ContentId(sha256),
            chunks,
        })
    }

    /// Deterministic protobuf encoding (the bytes a signature would cover).
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// Decodes and validates [`Manifest::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m = pb::Manifest::decode(bytes).map_err(ManifestError::Decode)?;
        Self::from_proto(&m)
    }

    /// Builds the manifest of everything `reader` yields, in one streaming pass.
    pub fn from_reader(reader: impl Read, chunk_size: u32) -> Result<Self, BuildError> {
        Self::build_from(reader, ManifestBuilder::new(chunk_size)?)
    }

    /// Builds the manifest of everything `reader` yields with content-defined chunks.
    pub fn from_reader_cdc(reader: impl Read, params: CdcParams) -> Result<Self, BuildError> {
        Self::build_from(reader, ManifestBuilder::content_defined(params)?)
    }

    fn build_from(mut reader: impl Read, mut builder: ManifestBuilder) -> Result<Self, BuildError> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BuildError::Io(e)),
            };
            builder.update(&buf[..n])?;
        }
        Ok(builder.finish())
    }
}

/// Building a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad chunk size or too many chunks.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Reading the content failed.
    #[error("reading content failed")]
    Io(#[source] io::Error),
}

/// How a builder cuts chunks.
enum Cutter {
    Fixed {
        chunk_size: u32,
        // Boxed: a hasher is ~2 KB, the other variant a few words.
        current: Box<blake3::Hasher>,
        current_len: u32,
    },
    Cdc {
        params: CdcParams,
        /// Bytes not yet cut (fewer than `params.max` between updates).
        pending: Vec<u8>,
        starts: Vec<u64>,
        /// Where `pending` starts in the content.
        cut_at: u64,
    },
}

/// Builds a [`Manifest`] from bytes fed in any slicing, in one pass.
pub struct ManifestBuilder {
    cutter: Cutter,
    size: u64,
    sha256: Sha256,
    chunks: Vec<[u8; 32]>,
}

impl fmt::Debug for ManifestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ManifestBuilder");
        match &self.cutter {
            Cutter::Fixed { chunk_size, .. } => d.field("chunk_size", chunk_size),
            Cutter::Cdc { params, .. } => d.field("cdc", params),
        };
        d.field("size", &self.size).finish_non_exhaustive()
    }
}

impl ManifestBuilder {
    /// A builder for the given chunk size (checked with [`check_chunk_size`]).
    pub fn new(chunk_size: u32) -> Result<Self, ManifestError> {
        let chunk_size = check_chunk_size(u64::from(chunk_size))?;
        Ok(Self {
            cutter: Cutter::Fixed {
                chunk_size,
                current: Box::new(blake3::Hasher::new()),
                current_len: 0,
            },
            size: 0,
            sha256: Sha256::new(),
            chunks: Vec::new(),
        })
    }

    /// A builder that cuts content-defined chunks (checked with [`check_cdc_params`]):
    /// the same boundaries as [`cdc::chunks`] over the whole content, however it is fed.
    pub fn content_defined(params: CdcParams) -> Result<Self, ManifestError> {
        check_cdc_params(&params)?;
        Ok(Self {
            cutter: Cutter::Cdc {
                params,
                pending: Vec::new(),
                starts: Vec::new(),
                cut_at: 0,
            },
            size: 0,
            sha256: Sha256::new(),
            chunks: Vec::new(),
        })
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Feeds the next bytes of the content.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), ManifestError> {
        match &mut self.cutter {
            Cutter::Fixed {
                chunk_size,
                current,
                current_len,
            } => {
                let chunks = chunk_count(self.size + data.len() as u64, *chunk_size);
                if chunks > MAX_CHUNKS {
                    return Err(ManifestError::TooManyChunks { chunks });
                }
                self.sha256.update(data);
                self.size += data.len() as u64;
                while !data.is_empty() {
                    let room = (*chunk_size - *current_len) as usize;
                    let take = room.min(data.len());
                    current.update(&data[..take]);
                    *current_len += take as u32;
                    data = &data[take..];
                    if *current_len == *chunk_size {
                        self.chunks.push(*current.finalize().as_bytes());
                        current.reset();
                        *current_len = 0;
                    }
                }
            }
            Cutter::Cdc {
                params,
                pending,
                starts,
                cut_at,
            } => {
                self.sha256.update(data);
                self.size += data.len() as u64;
                pending.extend_from_slice(data);
                // A cut within the first `max` bytes is final once `max` bytes are here.
                let mut at = 0;
                while pending.len() - at >= params.max {
                    let len = cdc::cut(&pending[at..], params);
                    starts.push(*cut_at + at as u64);
                    self.chunks
                        .push(*blake3::hash(&pending[at..at + len]).as_bytes());
                    at += len;
                }
                pending.drain(..at);
                *cut_at += at as u64;
                // What is left makes at most one chunk per `min` bytes: refuse now
                // rather than let `finish` go past the limit.
                let chunks =
                    self.chunks.len() as u64 + (pending.len() as u64).div_ceil(params.min as u64);
                if chunks > MAX_CHUNKS {
                    return Err(ManifestError::TooManyChunks { chunks });
                }
            }
        }
        Ok(())
    }

    /// The SHA-256 of everything fed so far, without consuming the builder.
    pub fn sha256_so_far(&self) -> ContentId {
        ContentId(self.sha256.clone().finalize().into())
    }

    /// Finishes the last (short) chunk and returns the manifest.
    pub fn finish(mut self) -> Manifest {
        let layout = match self.cutter {
            Cutter::Fixed {
                chunk_size,
                current,
                current_len,
            } => {
                if current_len > 0 {
                    self.chunks.push(*current.finalize().as_bytes());
                }
                Layout::Fixed(chunk_size)
            }
            Cutter::Cdc {
                params,
                pending,
                mut starts,
                cut_at,
            } => {
                let mut at = 0;
                while at < pending.len() {
                    let len = cdc::cut(&pending[at..], &params);
                    starts.push(cut_at + at as u64);
                    self.chunks
                        .push(*blake3::hash(&pending[at..at + len]).as_bytes());
                    at += len;
                }
                starts.push(self.size);
                Layout::Cdc { params, starts }
            }
        };
        Manifest {
            size: self.size,
            layout,
            sha256: ContentId(self.sha256.finalize().into()),
            chunks: self.chunks,
        }
    }
}

/// Streams `reader` and checks its size and SHA-256 against `expected`.
pub fn verify_sha256(
    mut reader: impl Read,
    expected: ContentId,
    expected_size: u64,
) -> Result<(), VerifyError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VerifyError::Io(e)),
        };
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    if size != expected_size {
        return Err(VerifyError::Size {
            expected: expected_size,
            actual: size,
        });
    }
    let actual = ContentId(hasher.finalize().into());
    if actual != expected {
        return Err(VerifyError::Sha256 { expected, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u32 = 1024;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn boundary_sizes_chunk_and_verify() {
        let cs = CS as usize;
        for len in [0, 1, cs - 1, cs, cs + 1, 10 * cs] {
            let data = content(len);
            let m = Manifest::from_reader(&data[..], CS).unwrap();
            assert_eq!(m.size(), len as u64);
            assert_eq!(u64::from(m.chunk_count()), (len as u64).div_ceil(CS as u64));
            assert_eq!(m.content_id(), ContentId::of_bytes(&data));
            for i in 0..m.chunk_count() {
                let r = m.chunk_range(i).unwrap();
                m.verify_chunk(i, &data[r.start as usize..r.end as usize])
                    .unwrap();
            }
            assert!(matches!(
                m.verify_chunk(m.chunk_count(), &[]),
                Err(VerifyError::NoSuchChunk { .. })
            ));
            verify_sha256(&data[..], m.content_id(), len as u64).unwrap();
        }
    }

    #[test]
    fn corrupt_chunk_and_content_are_rejected() {
        let mut data = content(3 * CS as usize + 7);
        let m = Manifest::from_reader(&data[..], CS).unwrap();
        data[CS as usize + 5] ^= 1;
        assert!(matches!(
            m.verify_chunk(1, &data[CS as usize..2 * CS as usize]),
            Err(VerifyError::ChunkHash { index: 1 })
        ));
        assert!(matches!(
            m.verify_chunk(1, &data[CS as usize..2 * CS as usize - 1]),
            Err(VerifyError::ChunkLength { .. })
        ));
        assert!(matches!(
            verify_sha256(&data[..], m.content_id(), m.size()),
            Err(VerifyError::Sha256 { .. })
        ));
        assert!(matches!(
            verify_sha256(&data[..10], m.content_id(), m.size()),
            Err(VerifyError::Size { .. })
        ));
    }

    #[test]
    fn chunk_size_rules() {
        assert!(ManifestBuilder::new(1000).is_err());
        assert!(ManifestBuilder::new(512).is_err());
        assert!(ManifestBuilder::new(MAX_CHUNK_SIZE * 2).is_err());
        assert!(ManifestBuilder::new(DEFAULT_CHUNK_SIZE).is_ok());
    }

    #[test]
    fn decode_rejects_inconsistent_manifests() {
        let m = Manifest::from_reader(&content(5000)[..], CS).unwrap();
        let mut p = m.to_proto();
        p.chunk_blake3.pop();
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::ChunkCount { .. })
        ));
        let mut p = m.to_proto();
        p.sha256.push(0);
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::HashLength { .. })
        ));
        let mut p = m.to_proto();
        p.chunk_size = 3000;
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::ChunkSize(3000))
        ));
        let mut p = m.to_proto();
        p.size = u64::MAX;
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::TooManyChunks { .. })
        ));
        assert!(matches!(
            Manifest::decode(&[0xff, 0xff, 0xff]),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn content_id_parses_hex() {
        let id = ContentId::of_bytes(b"x");
        assert_eq!(id.to_hex().parse::<ContentId>().unwrap(), id);
        assert_eq!(id.to_hex().to_uppercase().parse::<ContentId>().unwrap(), id);
        assert!("abc".parse::<ContentId>().is_err());
        assert!("g".repeat(64).parse::<ContentId>().is_err());
    }

    /// `data` fed to `b` in the pieces `cuts` (offsets, any order) make.
    fn fed_in_pieces(mut b: ManifestBuilder, data: &[u8], cuts: Vec<usize>) -> Manifest {
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
        points.sort_unstable();
        let mut at = 0;
        for p in points.into_iter().chain([data.len()]) {
            b.update(&data[at..p]).unwrap();
            at = p;
        }
        b.finish()
    }

    const SMALL_CDC: CdcParams = CdcParams {
        min: 256,
        avg: 1024,
        max: 4096,
    };

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        crate::test_noise(len, seed)
    }

    #[test]
    fn content_defined_chunks_follow_the_chunker_and_verify() {
        let data = noise(100_000, 7);
        let m = Manifest::from_reader_cdc(&data[..], SMALL_CDC).unwrap();
        let cuts = cdc::chunks(&data, &SMALL_CDC);
        assert_eq!(m.chunk_count() as usize, cuts.len());
        assert_eq!(m.chunk_size(), 0);
        assert_eq!(m.max_chunk_len(), 4096);
        assert_eq!(m.cdc(), Some(&SMALL_CDC));
        for (i, &(off, len)) in cuts.iter().enumerate() {
            let r = m.chunk_range(i as u32).unwrap();
            assert_eq!(r, off as u64..(off + len) as u64);
            m.verify_chunk(i as u32, &data[off..off + len]).unwrap();
        }
        assert!(m.chunk_range(m.chunk_count()).is_none());
        assert!(matches!(
            m.verify_chunk(0, &data[..cuts[0].1 - 1]),
            Err(VerifyError::ChunkLength { .. })
        ));
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.encode(), m.encode());
        // Empty content: no chunks, still content-defined.
        let empty = Manifest::from_reader_cdc(&[][..], SMALL_CDC).unwrap();
        assert_eq!(empty.chunk_count(), 0);
        assert_eq!(Manifest::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn decode_rejects_inconsistent_content_defined_manifests() {
        let m = Manifest::from_reader_cdc(&noise(20_000, 8)[..], SMALL_CDC).unwrap();
        let cdc_err =
            |p: &pb::Manifest| matches!(Manifest::from_proto(p), Err(ManifestError::Cdc(_)));
        let mut p = m.to_proto();
        p.chunk_lengths[0] += 1;
        assert!(cdc_err(&p), "lengths that do not add up to the size");
        let mut p = m.to_proto();
        p.chunk_size = 1024;
        assert!(cdc_err(&p), "a chunk size beside content-defined chunks");
        let mut p = m.to_proto();
        p.chunk_lengths[0] = 5000;
        assert!(cdc_err(&p), "a chunk over max");
        let mut p = m.to_proto();
        p.chunk_lengths[0] = 0;
        assert!(cdc_err(&p), "an empty chunk");
        let mut p = m.to_proto();
        p.cdc = None;
        assert!(cdc_err(&p), "lengths without bounds");
        let mut p = m.to_proto();
        p.cdc.as_mut().unwrap().avg_size = 1000;
        assert!(cdc_err(&p), "avg not a power of two");
        let mut p = m.to_proto();
        p.chunk_blake3.pop();
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::ChunkCount { .. })
        ));
        // A reader that ignores `cdc` and `chunk_lengths` sees chunk size 0 and refuses.
        let mut p = m.to_proto();
        p.cdc = None;
        p.chunk_lengths.clear();
        assert!(matches!(
            Manifest::from_proto(&p),
            Err(ManifestError::ChunkSize(0))
        ));
        assert!(
            ManifestBuilder::content_defined(CdcParams {
                min: 1 << 20,
                avg: 1 << 26,
                max: 1 << 27,
            })
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn content_defined_builder_cuts_the_same_however_fed(len in 0usize..40_000, cuts in proptest::collection::vec(0usize..40_000, 0..8), seed in 0u64..4) {
            let data = noise(len, seed);
            let whole = Manifest::from_reader_cdc(&data[..], SMALL_CDC).unwrap();
            let fed = fed_in_pieces(ManifestBuilder::content_defined(SMALL_CDC).unwrap(), &data, cuts);
            prop_assert_eq!(&fed, &whole);
            let expected: Vec<u64> = cdc::chunks(&data, &SMALL_CDC).iter().map(|&(o, _)| o as u64).collect();
            let got: Vec<u64> = (0..fed.chunk_count()).map(|i| fed.chunk_range(i).unwrap().start).collect();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn any_slicing_gives_the_same_manifest(len in 0usize..9000, cuts in proptest::collection::vec(0usize..9000, 0..8)) {
            let data = content(len);
            let whole = Manifest::from_reader(&data[..], CS).unwrap();
            prop_assert_eq!(fed_in_pieces(ManifestBuilder::new(CS).unwrap(), &data, cuts), whole);
        }

        #[test]
        fn codec_roundtrips_and_is_deterministic(len in 0usize..20_000, shift in 10u32..13) {
            let m = Manifest::from_reader(&content(len)[..], 1 << shift).unwrap();
            let bytes = m.encode();
            let back = Manifest::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }
    }
}
