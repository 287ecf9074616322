//! Bitfields: which chunks of a content a peer holds, and their compact wire form.
//!
//! A [`Bitfield`] is a fixed-length set of chunk indices `0..len`. On the wire it is
//! `len.div_ceil(8)` bytes, least significant bit first: chunk `i` is bit `i % 8` (value
//! `1 << (i % 8)`) of byte `i / 8`, and the unused bits of the last byte are zero.
//! [`Bitfield::from_bytes`] checks both rules, so a decoded bitfield never claims a
//! chunk past the end of the content.

use std::fmt::{self, Write as _};

/// Bits per storage word.
const WORD_BITS: u32 = u64::BITS;

/// A bitfield that cannot be decoded for the expected chunk count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    /// The byte length does not match the chunk count.
    #[error("a bitfield of {len} chunks takes {expected} bytes, got {actual}")]
    Length {
        /// Chunks in the content.
        len: u32,
        /// Bytes a bitfield of `len` chunks takes (`len.div_ceil(8)`).
        expected: usize,
        /// Bytes received.
        actual: usize,
    },
    /// A bit at or past `len` is set.
    #[error("a bitfield of {len} chunks has bit {index} set, past the last chunk")]
    BitPastEnd {
        /// Chunks in the content.
        len: u32,
        /// The first offending bit.
        index: u32,
    },
}

/// A fixed-length set of chunk indices `0..len`: the chunks of one content that a peer
/// (or this agent) holds.
///
/// The number of set bits is cached, so [`count`](Self::count) and
/// [`is_full`](Self::is_full) are O(1).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bitfield {
    len: u32,
    count: u32,
    words: Vec<u64>,
}

impl Bitfield {
    /// An empty bitfield of `len` chunks (no chunk held).
    pub fn new(len: u32) -> Self {
        Self {
            len,
            count: 0,
            words: vec![0; words_for(len)],
        }
    }

    /// A full bitfield of `len` chunks (every chunk held).
    pub fn full(len: u32) -> Self {
        let mut words = vec![u64::MAX; words_for(len)];
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(len);
        }
        Self {
            len,
            count: len,
            words,
        }
    }

    /// Number of chunks the bitfield covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the bitfield covers no chunk at all (`len() == 0`; such a bitfield is
    /// also full). For "holds no chunk" use `count() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks held (set bits).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Number of chunks missing (`len() - count()`).
    pub fn missing(&self) -> u32 {
        self.len - self.count
    }

    /// Whether chunk `index` is held; `false` for an index at or past `len()`.
    pub fn get(&self, index: u32) -> bool {
        index < self.len && self.words[word(index)] & bit(index) != 0
    }

    /// Marks chunk `index` as held; returns whether it was missing before.
    ///
    /// # Panics
    ///
    /// If `index >= len()`.
    pub fn set(&mut self, index: u32) -> bool {
        self.check(index);
        let w = &mut self.words[word(index)];
        let was_missing = *w & bit(index) == 0;
        *w |= bit(index);
        self.count += u32::from(was_missing);
        was_missing
    }

    /// Marks chunk `index` as missing; returns whether it was held before.
    ///
    /// # Panics
    ///
    /// If `index >= len()`.
    pub fn clear(&mut self, index: u32) -> bool {
        self.check(index);
        let w = &mut self.words[word(index)];
        let was_set = *w & bit(index) != 0;
        *w &= !bit(index);
        self.count -= u32::from(was_set);
        was_set
    }

    /// ORs this bitfield's words into `acc` (as many as both have): the union of
    /// several bitfields of the same length, one word at a time.
    pub(crate) fn or_into(&self, acc: &mut [u64]) {
        for (a, w) in acc.iter_mut().zip(&self.words) {
            *a |= w;
        }
    }

    /// Whether every chunk is held (true for a bitfield of length 0).
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// The held chunk indices, ascending.
    pub fn iter_set(&self) -> Indices<'_> {
        Indices::new(self, false)
    }

    /// The missing chunk indices, ascending.
    pub fn iter_missing(&self) -> Indices<'_> {
        Indices::new(self, true)
    }

    /// The wire form: `len().div_ceil(8)` bytes, least significant bit first, unused
    /// bits of the last byte zero.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.len.div_ceil(8) as usize;
        self.words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(n)
            .collect()
    }

    /// Decodes the wire form of a bitfield of `len` chunks (see [`to_bytes`](Self::to_bytes)).
    ///
    /// Rejects a byte length other than `len.div_ceil(8)` and any set bit at or past
    /// `len`. Never panics, whatever the input.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, BitfieldError> {
        let expected = len.div_ceil(8) as usize;
        if bytes.len() != expected {
            return Err(BitfieldError::Length {
                len,
                expected,
                actual: bytes.len(),
            });
        }
        let words: Vec<u64> = bytes
            .chunks(8)
            .map(|piece| {
                let mut buf = [0u8; 8];
                buf[..piece.len()].copy_from_slice(piece);
                u64::from_le_bytes(buf)
            })
            .collect();
        debug_assert_eq!(words.len(), words_for(len));
        if let Some(&last) = words.last() {
            let extra = last & !tail_mask(len);
            if extra != 0 {
                let index = (words.len() as u32 - 1) * WORD_BITS + extra.trailing_zeros();
                return Err(BitfieldError::BitPastEnd { len, index });
            }
        }
        let count = words.iter().map(|w| w.count_ones()).sum();
        Ok(Self { len, count, words })
    }

    fn check(&self, index: u32) {
        assert!(
            index < self.len,
            "chunk index {index} out of range for a bitfield of {} chunks",
            self.len
        );
    }
}

impl fmt::Debug for Bitfield {
    /// `Bitfield(count/len 0110…)`; the bits are shown for up to 256 chunks.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({}/{}", self.count, self.len)?;
        if self.len <= 256 {
            f.write_char(' ')?;
            for i in 0..self.len {
                f.write_char(if self.get(i) { '1' } else { '0' })?;
            }
        }
        f.write_char(')')
    }
}

/// Iterator over the held ([`Bitfield::iter_set`]) or missing
/// ([`Bitfield::iter_missing`]) chunk indices of a bitfield, ascending.
#[derive(Debug, Clone)]
pub struct Indices<'a> {
    words: &'a [u64],
    len: u32,
    missing: bool,
    next_word: usize,
    current: u64,
    base: u32,
}

impl<'a> Indices<'a> {
    fn new(field: &'a Bitfield, missing: bool) -> Self {
        Self {
            words: &field.words,
            len: field.len,
            missing,
            next_word: 0,
            current: 0,
            base: 0,
        }
    }
}

impl Iterator for Indices<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        loop {
            if self.current != 0 {
                let offset = self.current.trailing_zeros();
                self.current &= self.current - 1;
                return Some(self.base + offset);
            }
            let raw = *self.words.get(self.next_word)?;
            let mut w = if self.missing { !raw } else { raw };
            if self.next_word + 1 == self.words.len() {
                w &= tail_mask(self.len);
            }
            self.base = self.next_word as u32 * WORD_BITS;
            self.next_word += 1;
            self.current = w;
        }
    }
}

impl std::iter::FusedIterator for Indices<'_> {}

fn words_for(len: u32) -> usize {
    len.div_ceil(WORD_BITS) as usize
}

fn word(index: u32) -> usize {
    (index / WORD_BITS) as usize
}

fn bit(index: u32) -> u64 {
    1 << (index % WORD_BITS)
}

/// Mask of the valid bits of the last word of a bitfield of `len` chunks.
fn tail_mask(len: u32) -> u64 {
    match len % WORD_BITS {
        0 => u64::MAX,
        r => (1 << r) - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundary_lengths() {
        for len in [0u32, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000] {
            let empty = Bitfield::new(len);
            assert_eq!(empty.count(), 0);
            assert_eq!(empty.missing(), len);
            assert_eq!(empty.is_full(), len == 0);
            assert_eq!(empty.to_bytes(), vec![0; len.div_ceil(8) as usize]);
            assert_eq!(empty.iter_set().count(), 0);
            assert!(empty.iter_missing().eq(0..len));

            let full = Bitfield::full(len);
            assert_eq!(full.count(), len);
            assert!(full.is_full());
            assert!(full.iter_set().eq(0..len));
            assert_eq!(full.iter_missing().count(), 0);
            assert!(!full.get(len), "an index past the end is never held");
            let bytes = full.to_bytes();
            assert_eq!(bytes.len(), len.div_ceil(8) as usize);
            if len % 8 != 0 {
                assert_eq!(*bytes.last().unwrap(), (1u8 << (len % 8)) - 1);
            }
            assert_eq!(Bitfield::from_bytes(len, &bytes).unwrap(), full);
        }
    }

    #[test]
    fn set_and_clear_report_changes_and_keep_the_count() {
        let mut b = Bitfield::new(70);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(b.set(69));
        assert_eq!(b.count(), 2);
        assert!(b.get(3) && b.get(69) && !b.get(4));
        assert!(b.clear(3));
        assert!(!b.clear(3));
        assert_eq!(b.count(), 1);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![69]);
    }

    #[test]
    fn wire_form_is_lsb_first() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(3);
        b.set(9);
        assert_eq!(b.to_bytes(), vec![0b0000_1001, 0b0000_0010]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_past_the_end_panics() {
        Bitfield::new(8).set(8);
    }

    #[test]
    fn decoder_rejects_wrong_length_and_stray_bits() {
        assert_eq!(
            Bitfield::from_bytes(9, &[0]),
            Err(BitfieldError::Length {
                len: 9,
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            Bitfield::from_bytes(0, &[0]),
            Err(BitfieldError::Length {
                len: 0,
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(
            Bitfield::from_bytes(9, &[0, 0b100]),
            Err(BitfieldError::BitPastEnd { len: 9, index: 10 })
        );
        assert_eq!(
            Bitfield::from_bytes(65, &[0, 0, 0, 0, 0, 0, 0, 0, 0b10]),
            Err(BitfieldError::BitPastEnd { len: 65, index: 65 })
        );
        assert!(Bitfield::from_bytes(16, &[0xff, 0xff]).unwrap().is_full());
    }

    fn arb_bitfield() -> impl Strategy<Value = Bitfield> {
        (0u32..300).prop_flat_map(|len| {
            proptest::collection::vec(any::<bool>(), len as usize).prop_map(move |bits| {
                let mut b = Bitfield::new(len);
                for (i, on) in bits.into_iter().enumerate() {
                    if on {
                        b.set(i as u32);
                    }
                }
                b
            })
        })
    }

    proptest! {
        #[test]
        fn round_trips(b in arb_bitfield()) {
            let bytes = b.to_bytes();
            prop_assert_eq!(bytes.len(), b.len().div_ceil(8) as usize);
            prop_assert_eq!(Bitfield::from_bytes(b.len(), &bytes).unwrap(), b);
        }

        #[test]
        fn count_matches_the_set_bits(b in arb_bitfield()) {
            let set: Vec<u32> = b.iter_set().collect();
            let missing: Vec<u32> = b.iter_missing().collect();
            prop_assert_eq!(set.len() as u32, b.count());
            prop_assert_eq!(missing.len() as u32, b.missing());
            prop_assert!(set.iter().all(|&i| b.get(i)));
            prop_assert!(missing.iter().all(|&i| !b.get(i)));
            prop_assert!(set.windows(2).all(|w| w[0] < w[1]));
            let ones: u32 = b.to_bytes().iter().map(|x| x.count_ones()).sum();
            prop_assert_eq!(ones, b.count());
        }

        #[test]
        fn decoder_never_panics((len, bytes) in (0u32..400).prop_flat_map(|len| {
            // Around the right length, so that both checks get exercised.
            let n = len.div_ceil(8) as usize;
            (Just(len), proptest::collection::vec(any::<u8>(), n.saturating_sub(1)..=n + 1))
        })) {
            if let Ok(b) = Bitfield::from_bytes(len, &bytes) {
                prop_assert_eq!(b.len(), len);
                prop_assert_eq!(b.to_bytes(), bytes);
                prop_assert_eq!(b.iter_set().count() as u32, b.count());
            }
        }
    }
}
