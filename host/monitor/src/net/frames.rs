//! A bounded queue of Ethernet frames, for every host-side queue between a
//! network backend and the guest.
//!
//! A guest that never activates its NIC, or stopped taking frames, must not
//! make the monitor hold frames without bound: each queue has a limit on
//! frames and on bytes. Producers that can wait (a tap, a socket) stop
//! reading while the queue is full, so the kernel's own bounded queue drops
//! and the monitor spends nothing; producers that cannot (a frame the
//! gateway's stack builds) have the frame dropped and counted.

use std::collections::VecDeque;

/// A FIFO of frames holding at most `max_frames` frames and about
/// `max_bytes` bytes (a frame is taken while fewer bytes are held, so the
/// bytes bound is overshot by at most one frame).
#[derive(Debug)]
pub struct FrameQueue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    dropped: u64,
}

impl FrameQueue {
    pub fn new(max_frames: usize, max_bytes: usize) -> FrameQueue {
        FrameQueue {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
            dropped: 0,
        }
    }

    /// Whether one more frame would be taken.
    pub fn has_room(&self) -> bool {
        self.frames.len() < self.max_frames && self.bytes < self.max_bytes
    }

    /// Appends `frame`, or drops and counts it when the queue is full;
    /// returns whether it was kept.
    pub fn push_back(&mut self, frame: Vec<u8>) -> bool {
        if !self.has_room() {
            self.dropped += 1;
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        true
    }

    /// Counts a frame the producer dropped itself (it saw no room).
    pub fn count_dropped(&mut self) {
        self.dropped += 1;
    }

    /// Puts back at the front a frame just taken with
    /// [`FrameQueue::pop_front`] (never dropped: it was counted in).
    pub fn push_front(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_front(frame);
    }

    pub fn pop_front(&mut self) -> Option<Vec<u8>> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    pub fn front(&self) -> Option<&[u8]> {
        self.frames.front().map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of frames held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_frames_and_bytes_and_counts_drops() {
        let mut q = FrameQueue::new(3, 1000);
        assert!(q.push_back(vec![0; 10]));
        assert!(q.push_back(vec![0; 10]));
        assert!(q.push_back(vec![0; 10]));
        assert!(!q.push_back(vec![0; 10]), "a fourth frame is dropped");
        assert_eq!((q.len(), q.bytes(), q.dropped()), (3, 30, 1));
        let f = q.pop_front().unwrap();
        assert!(q.has_room());
        q.push_front(f);
        assert!(!q.has_room());

        let mut q = FrameQueue::new(100, 1000);
        assert!(q.push_back(vec![0; 999]));
        assert!(
            q.push_back(vec![0; 600]),
            "taken while under the byte bound"
        );
        assert!(!q.push_back(vec![0; 1]), "then full");
        assert_eq!(q.bytes(), 1599);
        q.clear();
        assert_eq!((q.len(), q.bytes(), q.dropped()), (0, 0, 1));
    }
}
