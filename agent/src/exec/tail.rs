//! A bounded "last N bytes" buffer for child-process output.
//!
//! [`TailBuffer`] keeps at most `max` bytes: when more arrive, the oldest bytes are
//! dropped, so a child that writes gigabytes costs at most `max` bytes of memory (plus
//! the deque's growth slack, never more than `2 * max`). [`TailBuffer::to_string_lossy`]
//! turns the kept bytes into valid UTF-8 that is still at most `max` bytes long.

use std::collections::VecDeque;

/// The first allocation of a tail buffer; it grows on demand up to its bound, so a
/// huge bound (say `usize::MAX` by mistake) never allocates up front.
const INITIAL_CAPACITY: usize = 4096;

/// Keeps the last `max` bytes written to it.
#[derive(Debug)]
pub(crate) struct TailBuffer {
    buf: VecDeque<u8>,
    max: usize,
    /// Bytes ever pushed (kept or dropped).
    total: u64,
}

impl TailBuffer {
    pub(crate) fn new(max: usize) -> Self {
        TailBuffer {
            buf: VecDeque::with_capacity(max.min(INITIAL_CAPACITY)),
            max,
            total: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the bound.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.total = self.total.saturating_add(data.len() as u64);
        if self.max == 0 {
            return;
        }
        if data.len() >= self.max {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.max..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.max);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// Whether some bytes were dropped (the buffer is not the whole output).
    pub(crate) fn truncated(&self) -> bool {
        self.total > self.buf.len() as u64
    }

    /// The kept bytes, in order.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let (a, b) = self.buf.as_slices();
        let mut out = Vec::with_capacity(a.len() + b.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        out
    }

    /// The kept bytes as UTF-8 (invalid sequences replaced), at most `max` bytes long.
    pub(crate) fn to_string_lossy(&self) -> String {
        lossy_tail(&self.bytes(), self.max, self.truncated())
    }
}

/// Converts the tail `bytes` of some output to a `String` of at most `limit` bytes.
///
/// When `cut_front` is set the bytes start at an arbitrary offset, so up to three
/// leading UTF-8 continuation bytes (the rest of a character whose start was dropped)
/// are skipped instead of being turned into a replacement character. Invalid sequences
/// become U+FFFD (three bytes), which may lengthen the text; it is then cut from the
/// front, on a character boundary, back to `limit` bytes.
pub(crate) fn lossy_tail(bytes: &[u8], limit: usize, cut_front: bool) -> String {
    let mut start = bytes.len().saturating_sub(limit);
    let cut_front = cut_front || start > 0;
    if cut_front {
        let mut skipped = 0;
        while skipped < 3 && start < bytes.len() && bytes[start] & 0b1100_0000 == 0b1000_0000 {
            start += 1;
            skipped += 1;
        }
    }
    let text = String::from_utf8_lossy(&bytes[start..]);
    if text.len() <= limit {
        return text.into_owned();
    }
    let mut cut = text.len() - limit;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes() {
        let mut t = TailBuffer::new(5);
        t.push(b"abc");
        assert_eq!(t.bytes(), b"abc");
        assert!(!t.truncated());
        t.push(b"defg");
        assert_eq!(t.bytes(), b"cdefg");
        assert!(t.truncated());
        t.push(b"0123456789");
        assert_eq!(t.bytes(), b"56789");
        t.push(b"");
        assert_eq!(t.bytes(), b"56789");
        t.push(b"x");
        assert_eq!(t.to_string_lossy(), "6789x");
    }

    #[test]
    fn memory_stays_bounded_under_many_writes() {
        let mut t = TailBuffer::new(1000);
        let chunk = [b'a'; 777];
        for _ in 0..10_000 {
            t.push(&chunk);
        }
        assert_eq!(t.bytes().len(), 1000);
        assert!(t.buf.capacity() <= 2 * 1024 + INITIAL_CAPACITY);
        assert!(t.truncated());
    }

    #[test]
    fn zero_bound_keeps_nothing() {
        let mut t = TailBuffer::new(0);
        t.push(b"hello");
        assert_eq!(t.to_string_lossy(), "");
        assert!(t.truncated());
    }

    #[test]
    fn huge_bound_does_not_preallocate() {
        let mut t = TailBuffer::new(usize::MAX);
        t.push(b"ok");
        assert_eq!(t.to_string_lossy(), "ok");
    }

    #[test]
    fn lossy_tail_is_valid_and_bounded() {
        // "é" is two bytes; cutting at an odd offset splits one.
        let text = "é".repeat(10);
        let mut t = TailBuffer::new(7);
        t.push(text.as_bytes());
        let s = t.to_string_lossy();
        assert!(s.len() <= 7, "{s:?}");
        assert_eq!(s, "ééé");

        // Every invalid byte becomes a 3-byte U+FFFD: still bounded.
        let mut t = TailBuffer::new(10);
        t.push(&[0xff; 32]);
        let s = t.to_string_lossy();
        assert!(s.len() <= 10, "{s:?}");
        assert!(s.chars().all(|c| c == char::REPLACEMENT_CHARACTER));

        assert_eq!(lossy_tail(b"hello", 3, false), "llo");
        assert_eq!(lossy_tail(b"hi", 3, false), "hi");
        assert_eq!(lossy_tail(b"", 3, true), "");
    }
}
