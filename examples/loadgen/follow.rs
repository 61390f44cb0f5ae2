//! The soak scenario's per-stream check, kept across reconnects: every
//! publisher's events must arrive exactly once and in its order
//! (`seq` = the next one expected), from the first expected sequence to the
//! last acknowledged one. O(publishers) memory, so an hour of events costs
//! nothing (the bitsets of `tracker.rs` would grow with every event).

/// What one subscriber (through all its connections) expects and saw.
#[derive(Debug, Clone)]
pub struct Follow {
    /// Per publisher: the next sequence expected; `None` = not followed, or
    /// re-baselined by a `reset` (the next event seen sets it).
    next: Vec<Option<u64>>,
    /// Which publishers this subscriber's topics carry.
    followed: Vec<bool>,
    /// Events received (duplicates included).
    pub received: u64,
    /// Events skipped: a sequence arrived past the one expected.
    pub gaps: u64,
    /// Events that came again (or late, after a later one of the same publisher).
    pub dups: u64,
    /// Events of a publisher whose topics this stream does not follow.
    pub unexpected: u64,
    /// `reset` events seen.
    pub resets: u64,
}

/// What one event did to a [`Follow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The expected next event.
    InOrder,
    /// This many events before it never came.
    Gap(u64),
    /// Seen before (or older than one already seen).
    Duplicate,
    /// Not a publisher of this stream's topics.
    Unexpected,
}

impl Follow {
    /// Expects, from sequence 0, the publishers marked in `followed`.
    pub fn new(followed: Vec<bool>) -> Self {
        Self {
            next: followed.iter().map(|&f| f.then_some(0)).collect(),
            followed,
            received: 0,
            gaps: 0,
            dups: 0,
            unexpected: 0,
            resets: 0,
        }
    }

    /// Records one event of `publisher` with sequence `seq`.
    pub fn record(&mut self, publisher: u32, seq: u64) -> Seen {
        let p = publisher as usize;
        self.received += 1;
        if !self.followed.get(p).copied().unwrap_or(false) {
            self.unexpected += 1;
            return Seen::Unexpected;
        }
        match self.next[p] {
            None => {
                self.next[p] = Some(seq + 1);
                Seen::InOrder
            }
            Some(n) if seq == n => {
                self.next[p] = Some(n + 1);
                Seen::InOrder
            }
            Some(n) if seq > n => {
                self.gaps += seq - n;
                self.next[p] = Some(seq + 1);
                Seen::Gap(seq - n)
            }
            Some(_) => {
                self.dups += 1;
                Seen::Duplicate
            }
        }
    }

    /// A `reset`: the server trimmed past our resume point, so what came
    /// before is gone by design; every publisher re-baselines on its next event.
    pub fn reset(&mut self) {
        self.resets += 1;
        for (next, &f) in self.next.iter_mut().zip(&self.followed) {
            if f {
                *next = None;
            }
        }
    }

    /// Whether every followed publisher's events up to `acked[p]` (exclusive)
    /// have arrived.
    pub fn caught_up(&self, acked: &[u64]) -> bool {
        self.missing(acked) == 0
    }

    /// Events of `acked` (per publisher, sequences `0..acked[p]`) not yet
    /// received past the last one seen. A re-baselined publisher with
    /// nothing seen since counts as missing everything acked.
    pub fn missing(&self, acked: &[u64]) -> u64 {
        self.next
            .iter()
            .zip(&self.followed)
            .zip(acked)
            .filter(|((_, &f), _)| f)
            .map(|((next, _), &a)| a.saturating_sub(next.unwrap_or(0)))
            .sum()
    }
}
