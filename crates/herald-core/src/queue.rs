//! A first-in, first-out queue that keeps its front item inline.
//!
//! A connection's outbound queue almost always holds zero or one frame: a
//! delivery queues one and the write that follows takes it. With a
//! `VecDeque`, that one frame lives in a heap block of its own, one more
//! cache line to miss on each delivery at thousands of connections (and a
//! block per idle connection). [`InlineQueue`] keeps the front item in the
//! queue itself, next to the state that guards it; only a second item reaches
//! the heap.

use std::collections::VecDeque;

/// A FIFO queue whose front item is stored inline.
#[derive(Debug, Clone)]
pub struct InlineQueue<T> {
    /// The front item; `None` only when the queue is empty.
    front: Option<T>,
    /// Everything behind the front, in order.
    rest: VecDeque<T>,
}

impl<T> Default for InlineQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> InlineQueue<T> {
    /// An empty queue (allocates nothing).
    pub const fn new() -> Self {
        Self {
            front: None,
            rest: VecDeque::new(),
        }
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        usize::from(self.front.is_some()) + self.rest.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.front.is_none()
    }

    /// Queue `item` at the back.
    pub fn push_back(&mut self, item: T) {
        if self.front.is_none() {
            self.front = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    /// Queue `item` at the front.
    pub fn push_front(&mut self, item: T) {
        if let Some(old) = self.front.replace(item) {
            self.rest.push_front(old);
        }
    }

    /// Take the front item.
    pub fn pop_front(&mut self) -> Option<T> {
        let item = self.front.take()?;
        self.front = self.rest.pop_front();
        Some(item)
    }

    /// The front item.
    pub fn front(&self) -> Option<&T> {
        self.front.as_ref()
    }

    /// The front item, to change in place.
    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.front.as_mut()
    }

    /// The back item (the one pushed last), to change in place.
    pub fn back_mut(&mut self) -> Option<&mut T> {
        match self.rest.back_mut() {
            Some(back) => Some(back),
            None => self.front.as_mut(),
        }
    }

    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.front = None;
        self.rest.clear();
    }

    /// The items, front first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.front.iter().chain(self.rest.iter())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        PushBack(u8),
        PushFront(u8),
        Pop,
        Bump,
        BumpBack,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(Op::PushBack),
            1 => any::<u8>().prop_map(Op::PushFront),
            4 => Just(Op::Pop),
            1 => Just(Op::Bump),
            1 => Just(Op::BumpBack),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Any sequence of operations leaves the queue holding what a
        /// `VecDeque` would, in the same order.
        #[test]
        fn behaves_as_a_vecdeque(ops in proptest::collection::vec(op(), 0..64)) {
            let mut q = InlineQueue::new();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Op::PushBack(x) => { q.push_back(x); model.push_back(x); }
                    Op::PushFront(x) => { q.push_front(x); model.push_front(x); }
                    Op::Pop => prop_assert_eq!(q.pop_front(), model.pop_front()),
                    Op::Bump => {
                        if let Some(x) = q.front_mut() { *x = x.wrapping_add(1); }
                        if let Some(x) = model.front_mut() { *x = x.wrapping_add(1); }
                    }
                    Op::BumpBack => {
                        if let Some(x) = q.back_mut() { *x = x.wrapping_add(1); }
                        if let Some(x) = model.back_mut() { *x = x.wrapping_add(1); }
                    }
                    Op::Clear => { q.clear(); model.clear(); }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.is_empty(), model.is_empty());
                prop_assert_eq!(q.front(), model.front());
                prop_assert_eq!(q.iter().copied().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn one_item_stays_off_the_heap() {
        let mut q = InlineQueue::new();
        q.push_back(1);
        assert_eq!(q.rest.capacity(), 0);
        q.push_back(2);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), None);
    }
}
