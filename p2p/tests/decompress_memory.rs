//! A decompression bomb costs a receiver no more memory than the chunk it stands for:
//! `arcade_p2p::compress::decompress` is measured with a counting allocator while it
//! refuses frames that would expand to 64 × the manifest's chunk length. The same
//! measurement of an unbounded decoder (`zstd::stream::decode_all`) on the same frame
//! shows what the bound prevents, so the test fails if the bound goes.
//!
//! What is counted is the Rust heap (the output buffers); zstd's own context is C
//! memory, bounded by zstd itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, keeping the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `alloc` above for this layout.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak heap growth while `f` runs, bytes.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = IN_USE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

#[test]
fn bombs_are_refused_within_the_chunk_length() {
    const CHUNK: usize = 64 * 1024;
    const EXPANDS_TO: usize = 64 * CHUNK;
    let zeros = vec![0u8; EXPANDS_TO];
    // Undeclared size: only decoding tells how large it is.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &zeros).unwrap();
    let undeclared = enc.finish().unwrap();
    // Declared size, larger than the chunk.
    let declared = zstd::bulk::compress(&zeros, 3).unwrap();
    drop(zeros);
    assert!(undeclared.len() < CHUNK && declared.len() < CHUNK);

    for (what, frame) in [("undeclared", &undeclared), ("declared", &declared)] {
        let (result, peak) = peak_during(|| arcade_p2p::compress::decompress(frame, CHUNK));
        assert!(result.is_err(), "{what} bomb accepted");
        assert!(
            peak <= 2 * CHUNK,
            "refusing the {what} bomb took {peak} bytes of heap for a {CHUNK}-byte chunk"
        );
    }

    // The unbounded decoder on the same frame: the allocation the bound prevents.
    let (out, peak) = peak_during(|| zstd::stream::decode_all(&undeclared[..]).unwrap().len());
    assert_eq!(out, EXPANDS_TO);
    assert!(
        peak >= EXPANDS_TO,
        "the measurement sees an unbounded decode ({peak} bytes)"
    );
}
