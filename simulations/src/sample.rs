//! Deterministic generated content, streamed in blocks so that any size can be produced
//! without holding it in memory, and the demo's sample plugin (a real `#!/bin/sh`
//! executable padded to a chosen size).

/// A deterministic byte stream (xorshift), produced in blocks.
#[derive(Debug, Clone)]
pub struct ContentStream {
    state: u64,
    remaining: u64,
}

impl ContentStream {
    /// `len` bytes determined by `seed`.
    pub fn new(len: u64, seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            remaining: len,
        }
    }

    /// The next block of at most `max` bytes, or `None` at the end.
    pub fn next_block(&mut self, max: usize) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        let n = (max as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let word = self.state.to_le_bytes();
            let take = (n - out.len()).min(8);
            out.extend_from_slice(&word[..take]);
        }
        Some(out)
    }
}

/// A generated executable of exactly `size` bytes (at least the script line), in 1 MiB
/// blocks: `#!/bin/sh` + `exit 0`, then deterministic padding from `seed`. Streamed, so
/// any size costs one block of memory.
pub fn executable_blocks(size: u64, seed: u64) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    let head = b"#!/bin/sh\nexit 0\n".to_vec();
    let mut rest = ContentStream::new(size.saturating_sub(head.len() as u64), seed);
    std::iter::once(head).chain(std::iter::from_fn(move || rest.next_block(1 << 20)))
}

/// The demo plugin: a shell script that prints its stage as JSON, followed by comment
/// lines of generated text so that the file is `size` bytes (at least the script).
pub fn sample_plugin(size: usize) -> Vec<u8> {
    let mut out: Vec<u8> = b"#!/bin/sh\n# Arcade Mesh sample plugin: reports the stage it runs in.\nprintf '{\"plugin\":\"demo/hello\",\"stage\":\"%s\"}\\n' \"$1\"\nexit 0\n".to_vec();
    let script_len = out.len();
    let mut stream = ContentStream::new(u64::MAX, 7);
    while out.len() < size {
        let block = stream.next_block(48).unwrap_or_default();
        out.extend_from_slice(b"# ");
        out.extend(block.iter().map(|b| b'a' + b % 26));
        out.push(b'\n');
    }
    out.truncate(size.max(script_len));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_and_exact() {
        let mut a = ContentStream::new(10_000, 3);
        let mut b = ContentStream::new(10_000, 3);
        let mut total = 0;
        while let Some(block) = a.next_block(3000) {
            assert_eq!(Some(&block), b.next_block(3000).as_ref());
            total += block.len();
        }
        assert_eq!(total, 10_000);
        assert_ne!(
            ContentStream::new(64, 1).next_block(64),
            ContentStream::new(64, 2).next_block(64)
        );
    }

    #[test]
    fn executable_blocks_have_the_requested_size_and_a_shebang() {
        let blocks: Vec<Vec<u8>> = executable_blocks(3 << 20, 1).collect();
        assert!(blocks[0].starts_with(b"#!/bin/sh\n"));
        assert_eq!(blocks.iter().map(Vec::len).sum::<usize>(), 3 << 20);
        assert!(blocks.iter().all(|b| b.len() <= 1 << 20));
    }

    #[test]
    fn sample_plugin_is_a_script_of_the_requested_size() {
        let p = sample_plugin(100_000);
        assert_eq!(p.len(), 100_000);
        assert!(p.starts_with(b"#!/bin/sh\n"));
    }
}
