//! Sliding anti-replay window over message sequence numbers.
//!
//! Requests of one session travel over many HTTP/2 streams, and possibly several
//! connections, so they can arrive out of order. The window accepts every sequence
//! number once as long as it is within `WINDOW` of the highest one seen, in the style
//! of RFC 6479: a fixed bitmap, so memory per session is constant whatever the peer
//! sends.

/// How far behind the highest sequence number a message may still arrive.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("message {0} was already received (replay)")]
    Replayed(u64),
    #[error("message {seq} is too old: it is more than {WINDOW} behind the newest ({highest})")]
    TooOld { seq: u64, highest: u64 },
}

#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest sequence number accepted so far, None before the first.
    highest: Option<u64>,
    /// Bit `s % WINDOW` is set when `s` (within the window) was accepted.
    bits: [u64; WORDS],
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `seq` if it was not seen and is not too old, and records it.
    pub fn accept(&mut self, seq: u64) -> Result<(), ReplayError> {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.set(seq);
            return Ok(());
        };
        if seq > highest {
            self.advance(highest, seq);
            self.highest = Some(seq);
            self.set(seq);
            return Ok(());
        }
        if highest - seq >= WINDOW {
            return Err(ReplayError::TooOld { seq, highest });
        }
        if self.is_set(seq) {
            return Err(ReplayError::Replayed(seq));
        }
        self.set(seq);
        Ok(())
    }

    /// Clears the bits of the sequence numbers that slide into the window.
    fn advance(&mut self, highest: u64, seq: u64) {
        if seq - highest >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        for s in highest + 1..=seq {
            self.clear(s);
        }
    }

    fn position(seq: u64) -> (usize, u64) {
        let slot = seq % WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    fn set(&mut self, seq: u64) {
        let (word, mask) = Self::position(seq);
        self.bits[word] |= mask;
    }

    fn clear(&mut self, seq: u64) {
        let (word, mask) = Self::position(seq);
        self.bits[word] &= !mask;
    }

    fn is_set(&self, seq: u64) -> bool {
        let (word, mask) = Self::position(seq);
        self.bits[word] & mask != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn in_order_accepted_once() {
        let mut w = ReplayWindow::new();
        for s in 0..5000 {
            w.accept(s).unwrap();
            assert_eq!(w.accept(s), Err(ReplayError::Replayed(s)));
        }
    }

    #[test]
    fn out_of_order_within_window_accepted_once() {
        let mut w = ReplayWindow::new();
        for s in [10, 3, 7, 4, 11, 5, 1000, 20] {
            w.accept(s).unwrap();
        }
        for s in [10, 3, 7, 4, 11, 5, 1000, 20] {
            assert_eq!(w.accept(s), Err(ReplayError::Replayed(s)));
        }
        w.accept(6).unwrap();
    }

    #[test]
    fn too_old_rejected() {
        let mut w = ReplayWindow::new();
        w.accept(5000).unwrap();
        assert_eq!(
            w.accept(5000 - WINDOW),
            Err(ReplayError::TooOld {
                seq: 5000 - WINDOW,
                highest: 5000
            })
        );
        w.accept(5000 - WINDOW + 1).unwrap();
    }

    #[test]
    fn big_jump_clears_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(1).unwrap();
        w.accept(1 + 10 * WINDOW).unwrap();
        // 1 + 9*WINDOW + 1 shares a bit slot with the old `1` but was never seen.
        w.accept(2 + 9 * WINDOW).unwrap();
    }

    proptest! {
        /// Against a reference model: a HashSet of everything accepted, plus the
        /// window rule. Any arrival order of any sequence numbers.
        #[test]
        fn matches_reference_model(seqs in proptest::collection::vec(0u64..4096, 1..600)) {
            let mut w = ReplayWindow::new();
            let mut seen = HashSet::new();
            let mut highest: Option<u64> = None;
            for s in seqs {
                let expected = match highest {
                    Some(h) if s + WINDOW <= h => Err(ReplayError::TooOld { seq: s, highest: h }),
                    _ if seen.contains(&s) => Err(ReplayError::Replayed(s)),
                    _ => Ok(()),
                };
                prop_assert_eq!(w.accept(s), expected);
                if expected.is_ok() {
                    seen.insert(s);
                    highest = Some(highest.map_or(s, |h| h.max(s)));
                }
            }
        }
    }
}
