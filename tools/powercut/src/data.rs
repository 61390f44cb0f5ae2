//! File contents as sparse 4 KiB pages shared copy-on-write between the
//! volatile and the durable layer.
//!
//! Both layers of one file usually hold the same bytes, so a page is an
//! `Arc`: an `fsync` copies the *pointers* of the pages written since the last
//! one (O(dirty pages), not O(file size)), and the next write to a shared page
//! copies it first (`Arc::make_mut`). An absent page reads as zeros (holes,
//! `fallocate`, a size grown by `truncate`). Bytes past `size` in the last page
//! are always zero, so a file that grows again never shows stale data.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// The page size of the model: the unit of dirty tracking and of torn writes.
pub const PAGE: u64 = 4096;

/// One page of file data.
pub(crate) type Page = Arc<[u8; PAGE as usize]>;

/// The contents of one regular file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileData {
    /// The file's length in bytes.
    pub size: u64,
    /// Page index → page; absent pages are zeros.
    pub pages: BTreeMap<u64, Page>,
}

impl FileData {
    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = self.size.min(offset.saturating_add(len));
        if offset >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for (&index, page) in self.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        out
    }

    /// The whole file.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.size)
    }

    /// Writes `bytes` at `offset`, growing the file as needed. Returns the
    /// pages it changed.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Range<u64> {
        if bytes.is_empty() {
            return 0..0;
        }
        let end = offset + bytes.len() as u64;
        let pages = offset / PAGE..(end - 1) / PAGE + 1;
        for index in pages.clone() {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| Arc::new([0u8; PAGE as usize]));
            Arc::make_mut(page)[(from - page_start) as usize..(to - page_start) as usize]
                .copy_from_slice(&bytes[(from - offset) as usize..(to - offset) as usize]);
        }
        self.size = self.size.max(end);
        pages
    }

    /// Zeros `len` bytes from `offset` inside the file (a punched hole).
    /// Returns the pages it changed.
    pub fn zero(&mut self, offset: u64, len: u64) -> Vec<u64> {
        let end = self.size.min(offset.saturating_add(len));
        if offset >= end {
            return Vec::new();
        }
        let mut changed = Vec::new();
        let indices: Vec<u64> = self
            .pages
            .range(offset / PAGE..=(end - 1) / PAGE)
            .map(|(&i, _)| i)
            .collect();
        for index in indices {
            let page_start = index * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            if from == page_start && to == page_start + PAGE {
                self.pages.remove(&index);
            } else if let Some(page) = self.pages.get_mut(&index) {
                Arc::make_mut(page)[(from - page_start) as usize..(to - page_start) as usize]
                    .fill(0);
            }
            changed.push(index);
        }
        changed
    }

    /// Sets the length (truncate or extend with zeros). Returns the pages it
    /// changed: those dropped and the one whose tail was zeroed.
    pub fn set_len(&mut self, size: u64) -> Vec<u64> {
        let mut changed = Vec::new();
        if size < self.size {
            let keep = size.div_ceil(PAGE);
            let dropped = self.pages.split_off(&keep);
            changed.extend(dropped.keys().copied());
            if !size.is_multiple_of(PAGE) {
                let index = size / PAGE;
                if let Some(page) = self.pages.get_mut(&index) {
                    // Only unshare a page whose tail really holds bytes.
                    if page[(size % PAGE) as usize..].iter().any(|&b| b != 0) {
                        Arc::make_mut(page)[(size % PAGE) as usize..].fill(0);
                        changed.push(index);
                    }
                }
            }
        }
        self.size = size;
        changed
    }

    /// Takes page `index` (or its absence) from `other`.
    pub fn copy_page_from(&mut self, other: &FileData, index: u64) {
        match other.pages.get(&index) {
            Some(page) => {
                self.pages.insert(index, Arc::clone(page));
            }
            None => {
                self.pages.remove(&index);
            }
        }
    }

    /// Drops pages past `size` and zeros the tail of the last one, keeping the
    /// "zeros past the end" invariant after pages were copied in piecemeal.
    pub fn clip(&mut self) {
        let size = self.size;
        self.size = u64::MAX;
        self.set_len(size);
    }

    /// Bytes held in pages (for `statfs`).
    pub fn allocated(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_across_pages_and_holes() {
        let mut data = FileData::default();
        assert_eq!(data.write(4090, b"abcdefghij"), 0..2);
        assert_eq!(data.size, 4100);
        assert_eq!(data.read(4088, 100), b"\0\0abcdefghij".to_vec());
        data.write(3 * PAGE, b"z");
        assert_eq!(data.read(2 * PAGE, PAGE + 1).len() as u64, PAGE + 1);
        assert!(data.read(2 * PAGE, PAGE).iter().all(|&b| b == 0));
        assert_eq!(data.read(3 * PAGE, 10), b"z".to_vec());
        assert!(data.read(10_000_000, 10).is_empty());
    }

    #[test]
    fn truncate_zeros_the_tail_so_growing_again_shows_zeros() {
        let mut data = FileData::default();
        data.write(0, &[7u8; 10_000]);
        let changed = data.set_len(5000);
        assert_eq!(changed, vec![2, 1]);
        data.set_len(10_000);
        assert_eq!(data.read(4999, 2), vec![7, 0]);
        assert!(data.read(5000, 5000).iter().all(|&b| b == 0));
    }

    #[test]
    fn shared_pages_are_copied_on_write() {
        let mut live = FileData::default();
        live.write(0, b"old");
        let durable = live.clone();
        live.write(0, b"new");
        assert_eq!(durable.to_vec(), b"old");
        assert_eq!(live.to_vec(), b"new");
    }

    #[test]
    fn zero_punches_whole_pages_and_clears_partial_ones() {
        let mut data = FileData::default();
        data.write(0, &[1u8; 3 * PAGE as usize]);
        let changed = data.zero(100, 2 * PAGE);
        assert_eq!(changed, vec![0, 1, 2]);
        assert!(!data.pages.contains_key(&1));
        assert_eq!(data.read(99, 2), vec![1, 0]);
        assert_eq!(data.read(2 * PAGE + 99, 2), vec![0, 1]);
        assert_eq!(data.size, 3 * PAGE);
    }
}
