//! Reused chunk buffers. Every chunk a host serves is read from disk into a buffer, and
//! every chunk response it receives is read from the stream into one; a fresh
//! allocation each time is zeroed first (by the allocator, or by the kernel for fresh
//! pages) and then overwritten at once, which cost 4–7 % of the mesh's CPU. A
//! [`BufferPool`] keeps the buffers of finished chunks and hands them out again as they
//! are: the caller overwrites every byte before anything reads them.
//!
//! A buffer comes back to its pool when the last [`bytes::Bytes`] slice of it is dropped
//! ([`PooledBuf::freeze`]), so a chunk decoded from a response keeps its buffer until the
//! chunk is written. Idle buffers are bounded in bytes ([`MAX_IDLE_BYTES`] for the
//! process-wide pool); past the bound the oldest idle buffers are freed.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, OnceLock};

/// Smallest buffer worth pooling: below it allocation costs little.
pub const MIN_POOLED: usize = 64 * 1024;
/// Bytes of idle buffers the process-wide pool keeps.
pub const MAX_IDLE_BYTES: usize = 64 << 20;

/// A bounded pool of byte buffers (cheap to clone: clones share the pool).
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<Mutex<Idle>>,
}

#[derive(Debug, Default)]
struct Idle {
    /// Oldest first.
    buffers: VecDeque<Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
    reused: u64,
    allocated: u64,
}

/// How a pool served its callers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers handed out again.
    pub reused: u64,
    /// Buffers of a pooled size ([`MIN_POOLED`] and more) allocated: no idle one fitted.
    pub allocated: u64,
    /// Bytes of idle buffers now.
    pub idle_bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_idle_bytes` of idle buffers.
    pub fn new(max_idle_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Idle {
                max_bytes: max_idle_bytes,
                ..Idle::default()
            })),
        }
    }

    /// The process-wide pool the mesh uses ([`MAX_IDLE_BYTES`]).
    pub fn shared() -> &'static BufferPool {
        static SHARED: OnceLock<BufferPool> = OnceLock::new();
        SHARED.get_or_init(|| BufferPool::new(MAX_IDLE_BYTES))
    }

    /// A buffer of exactly `len` bytes whose contents are unspecified (left from an
    /// earlier use, or zero): the caller must overwrite all of them before reading any.
    /// An idle buffer is reused when its capacity is at least `len` and at most an
    /// eighth more; otherwise one is allocated.
    pub fn take(&self, len: usize) -> PooledBuf {
        if len >= MIN_POOLED {
            let mut idle = self.lock();
            let fits = |cap: usize| cap >= len && cap - len <= len / 8;
            let found = idle.buffers.iter().rposition(|b| fits(b.capacity()));
            if let Some(mut buf) = found.and_then(|i| idle.buffers.remove(i)) {
                idle.bytes -= buf.capacity();
                idle.reused += 1;
                drop(idle);
                // Shrinking is free; growing zeroes only the difference (a few bytes,
                // as response lengths differ by their framing).
                buf.resize(len, 0);
                return PooledBuf {
                    buf,
                    pool: Some(self.clone()),
                };
            }
            idle.allocated += 1;
            drop(idle);
            // A little headroom, so that a response a few framing bytes longer than a
            // chunk fits the buffer a served chunk of the same size gave back.
            let mut buf = Vec::with_capacity(len + len / 64);
            buf.resize(len, 0);
            return PooledBuf {
                buf,
                pool: Some(self.clone()),
            };
        }
        PooledBuf {
            buf: vec![0; len],
            pool: None,
        }
    }

    /// What the pool did so far.
    pub fn stats(&self) -> PoolStats {
        let idle = self.lock();
        PoolStats {
            reused: idle.reused,
            allocated: idle.allocated,
            idle_bytes: idle.bytes,
        }
    }

    /// Keeps `buf` for the next taker, freeing the oldest idle buffers to make room (a
    /// pool full of a size nobody asks for any more does not keep out the new size).
    fn give_back(&self, buf: Vec<u8>) {
        let mut idle = self.lock();
        if buf.capacity() > idle.max_bytes {
            return;
        }
        while idle.bytes + buf.capacity() > idle.max_bytes {
            let Some(old) = idle.buffers.pop_front() else {
                break;
            };
            idle.bytes -= old.capacity();
        }
        idle.bytes += buf.capacity();
        idle.buffers.push_back(buf);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // The pool's state stays consistent whatever panicked while holding it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer from a [`BufferPool`]; it goes back to the pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Option<BufferPool>,
}

impl PooledBuf {
    /// Read-only bytes over this buffer (no copy); the buffer returns to its pool when
    /// the last slice of them is dropped.
    pub fn freeze(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_buffer_is_handed_out_again() {
        let pool = BufferPool::new(8 << 20);
        let mut a = pool.take(1 << 20);
        a.fill(7);
        let at = a.as_ptr();
        let bytes = a.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        // A slice still holds the buffer.
        assert_eq!(pool.stats().idle_bytes, 0);
        assert_eq!(&slice[..], &[7; 10]);
        drop(slice);
        assert_eq!(pool.stats().idle_bytes, MIB_CAP);
        // A response a few bytes longer reuses it.
        let b = pool.take((1 << 20) - 5);
        assert_eq!(b.as_ptr(), at);
        assert_eq!(b.len(), (1 << 20) - 5);
        drop(b);
        let c = pool.take((1 << 20) + 3);
        assert_eq!(c.as_ptr(), at);
        assert_eq!(c.len(), (1 << 20) + 3);
        assert_eq!(
            pool.stats(),
            PoolStats {
                reused: 2,
                allocated: 1,
                idle_bytes: 0
            }
        );
    }

    /// The capacity the pool gives a fresh buffer of 1 MiB.
    const MIB_CAP: usize = (1 << 20) + (1 << 20) / 64;

    #[test]
    fn idle_bytes_are_bounded_and_sizes_must_fit() {
        let pool = BufferPool::new(3 * MIB_CAP);
        let held: Vec<PooledBuf> = (0..5).map(|_| pool.take(1 << 20)).collect();
        drop(held);
        // Three fit; the oldest two were freed.
        assert_eq!(pool.stats().idle_bytes, 3 * MIB_CAP);
        // Much smaller or larger requests do not take a 1 MiB buffer.
        let small = pool.take(256 << 10);
        let large = pool.take(2 << 20);
        assert_eq!(pool.stats().reused, 0);
        drop((small, large));
        assert!(pool.stats().idle_bytes <= 3 * MIB_CAP);
        // Tiny buffers are never pooled.
        let before = pool.stats();
        drop(pool.take(100));
        assert_eq!(pool.stats(), before);
        assert_eq!(pool.take(100).len(), 100);
    }

    #[test]
    fn a_new_size_displaces_idle_buffers_of_an_old_one() {
        let pool = BufferPool::new(2 * MIB_CAP);
        drop((pool.take(1 << 20), pool.take(1 << 20)));
        assert_eq!(pool.stats().idle_bytes, 2 * MIB_CAP);
        // The fleet moved on to 256 KiB chunks: they are pooled all the same.
        let small = pool.take(256 << 10);
        let at = small.as_ptr();
        drop(small);
        assert!(pool.stats().idle_bytes <= 2 * MIB_CAP);
        assert_eq!(pool.take(256 << 10).as_ptr(), at);
        // A buffer larger than the whole bound is never kept.
        drop(pool.take(3 << 20));
        assert!(pool.stats().idle_bytes <= 2 * MIB_CAP);
    }
}
