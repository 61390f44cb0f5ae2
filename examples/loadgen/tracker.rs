//! Per-stream gap / duplicate / order accounting of received payloads.

/// Gap / duplicate / order accounting for one stream.
///
/// Each publisher waits for its acknowledgement before sending its next event,
/// so on every stream one publisher's events must arrive in its own sequence
/// order; events of different publishers may interleave in any order.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// Per publisher: a bitset of the sequences received.
    seen: Vec<Vec<u64>>,
    /// Per publisher: the highest sequence received so far.
    highest: Vec<Option<u64>>,
    /// Events received (duplicates included).
    pub received: u64,
    /// Events received a second time (or more).
    pub duplicates: u64,
    /// Events received after a later event of the same publisher.
    pub out_of_order: u64,
}

impl SeqTracker {
    /// Records one received event.
    pub fn record(&mut self, publisher: u32, seq: u64) {
        let p = publisher as usize;
        if self.seen.len() <= p {
            self.seen.resize_with(p + 1, Vec::new);
            self.highest.resize(p + 1, None);
        }
        self.received += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let bits = &mut self.seen[p];
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        match self.highest[p] {
            Some(high) if seq < high => self.out_of_order += 1,
            _ => self.highest[p] = Some(seq),
        }
    }

    /// Distinct events received.
    pub fn distinct(&self) -> u64 {
        self.seen
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Events missing, given how many each publisher sent in `from..to`:
    /// `ranges[p]` is publisher `p`'s expected sequence range.
    pub fn missing(&self, ranges: &[std::ops::Range<u64>]) -> u64 {
        let mut missing = 0;
        for (p, range) in ranges.iter().enumerate() {
            for seq in range.clone() {
                let (word, bit) = ((seq / 64) as usize, seq % 64);
                let has = self
                    .seen
                    .get(p)
                    .and_then(|bits| bits.get(word))
                    .is_some_and(|w| w & (1 << bit) != 0);
                if !has {
                    missing += 1;
                }
            }
        }
        missing
    }

    /// Events received that no publisher was expected to send in `ranges`.
    pub fn unexpected(&self, ranges: &[std::ops::Range<u64>]) -> u64 {
        let expected_seen: u64 = ranges
            .iter()
            .enumerate()
            .map(|(p, r)| r.end - r.start - self.missing_one(p, r))
            .sum();
        self.distinct() - expected_seen
    }

    fn missing_one(&self, p: usize, range: &std::ops::Range<u64>) -> u64 {
        let mut ranges = vec![0..0; p];
        ranges.push(range.clone());
        self.missing(&ranges)
    }
}
