//! The manifest decoder (`arcade_p2p::Manifest::decode`) on arbitrary bytes, and
//! `ContentId::from_str` on the input as text.
//!
//! What `decode` accepts must be consistent: a legal chunk size, the chunk count that
//! size and chunk size imply (at most `MAX_CHUNKS`), chunk ranges that tile `0..size`
//! exactly, a deterministic re-encoding that decodes to an equal manifest, and
//! `verify_chunk` that answers every index and any data with `Ok`/`Err`, never a panic.
#![no_main]

use std::str::FromStr;

use arcade_p2p::manifest::{MAX_CHUNK_SIZE, MAX_CHUNKS, MIN_CHUNK_SIZE};
use arcade_p2p::{ContentId, Manifest, VerifyError};
use libfuzzer_sys::fuzz_target;

/// Largest chunk the target allocates a buffer for (larger ones are only checked with
/// wrong lengths).
const MAX_BUFFER: u64 = 64 * 1024;

fn check_content_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match ContentId::from_str(s) {
        Ok(id) => {
            assert_eq!(id.to_hex(), s.to_ascii_lowercase());
            assert_eq!(id.to_string(), id.to_hex());
            assert_eq!(ContentId::from_str(&id.to_hex()), Ok(id));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_manifest(data: &[u8], m: &Manifest) {
    let count = m.chunk_count();
    let cs = m.max_chunk_len();
    match m.cdc() {
        None => {
            assert_eq!(m.chunk_size(), cs);
            assert!(cs.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs));
            assert_eq!(u64::from(count), m.size().div_ceil(u64::from(cs)));
        }
        Some(p) => {
            assert_eq!(m.chunk_size(), 0);
            assert!(p.check().is_ok() && cs <= MAX_CHUNK_SIZE);
        }
    }
    assert!(u64::from(count) <= MAX_CHUNKS);

    // The chunk ranges tile 0..size: contiguous, non-empty, at most the largest chunk.
    let mut at = 0u64;
    for i in 0..count {
        let r = m
            .chunk_range(i)
            .expect("index below chunk_count has a range");
        assert_eq!(
            r.start,
            at,
            "chunk {i} does not start where {} ended",
            i.wrapping_sub(1)
        );
        assert!(
            r.start < r.end && r.end <= m.size(),
            "chunk {i}: {r:?} of {}",
            m.size()
        );
        assert!(r.end - r.start <= u64::from(cs));
        assert!(m.chunk_hash(i).is_some());
        at = r.end;
    }
    assert_eq!(at, m.size(), "chunks do not cover the content");
    assert!(m.chunk_range(count).is_none());
    assert!(m.chunk_hash(count).is_none());

    // Deterministic encoding that round-trips.
    let bytes = m.encode();
    let back = Manifest::decode(&bytes).expect("own encoding decodes");
    assert_eq!(&back, m);
    assert_eq!(back.encode(), bytes);
    assert_eq!(Manifest::from_proto(&m.to_proto()).expect("own proto"), *m);
    let _ = format!("{m:?}");

    // verify_chunk: every outcome is an error value, never a panic.
    let last = count.saturating_sub(1);
    for i in [0, 1, last, count, count.saturating_add(1), u32::MAX] {
        let expected = m.chunk_range(i).map(|r| r.end - r.start);
        for piece in [&[][..], &data[..data.len().min(1)], data] {
            let res = m.verify_chunk(i, piece);
            match expected {
                None => assert!(
                    matches!(res, Err(VerifyError::NoSuchChunk { .. })),
                    "{res:?}"
                ),
                Some(len) if len != piece.len() as u64 => {
                    assert!(
                        matches!(res, Err(VerifyError::ChunkLength { .. })),
                        "{res:?}"
                    )
                }
                Some(_) => {
                    let ok = blake3::hash(piece).as_bytes() == m.chunk_hash(i).unwrap();
                    assert_eq!(res.is_ok(), ok, "{res:?}");
                }
            }
        }
        if let Some(len) = expected.filter(|&l| l <= MAX_BUFFER) {
            let buf = vec![0u8; len as usize + 1];
            let res = m.verify_chunk(i, &buf[..len as usize]);
            let ok = blake3::hash(&buf[..len as usize]).as_bytes() == m.chunk_hash(i).unwrap();
            assert_eq!(res.is_ok(), ok, "{res:?}");
            assert!(matches!(
                m.verify_chunk(i, &buf),
                Err(VerifyError::ChunkLength { .. })
            ));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_content_id(data);
    match Manifest::decode(data) {
        Ok(m) => check_manifest(data, &m),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
