//! Bytes held in session buffers, counted across every connection
//! (`limits.max_buffered_bytes`). Each half of each session reports what
//! its buffers hold; past the bound, sessions stop reading new requests
//! until replies are delivered (or slow readers are cut by
//! `limits.client_write_timeout`) and the total falls. Replies keep
//! flowing meanwhile: they are what frees memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;

/// The bound and what all sessions hold now.
#[derive(Debug)]
pub struct BufferBudget {
    max: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl BufferBudget {
    pub fn new(max: usize) -> BufferBudget {
        BufferBudget {
            max,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Bytes held now, by every session together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn over(&self) -> bool {
        self.used() > self.max
    }

    /// Waits until the total is back under the bound.
    pub async fn wait_under(&self) {
        loop {
            let freed = self.freed.notified();
            if !self.over() {
                return;
            }
            freed.await;
        }
    }

    /// Counts `bytes` more, held outside any session's own account (reply
    /// frames a lane has handed to a session and it has not taken yet).
    pub fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back bytes counted with [`BufferBudget::add`].
    pub fn remove(&self, bytes: usize) {
        let was = self.used.fetch_sub(bytes, Ordering::Relaxed);
        if was > self.max && was - bytes <= self.max {
            self.freed.notify_waiters();
        }
    }

    /// An account of one buffer owner's bytes, given back on drop.
    pub fn account(&self) -> Held<'_> {
        Held {
            budget: self,
            bytes: 0,
        }
    }
}

/// What one session half holds, kept in its budget's total.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a BufferBudget,
    bytes: usize,
}

impl Held<'_> {
    /// This half now holds `bytes`.
    pub fn set(&mut self, bytes: usize) {
        let before = self.bytes;
        self.bytes = bytes;
        if bytes > before {
            self.budget
                .used
                .fetch_add(bytes - before, Ordering::Relaxed);
        } else if bytes < before {
            let was = self
                .budget
                .used
                .fetch_sub(before - bytes, Ordering::Relaxed);
            // Only a fall back under the bound can wake anyone.
            if was > self.budget.max && was - (before - bytes) <= self.budget.max {
                self.budget.freed.notify_waiters();
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_wait_while_the_total_is_over_and_resume_when_it_falls() {
        let budget = BufferBudget::new(100);
        let mut a = budget.account();
        let mut b = budget.account();
        a.set(80);
        b.set(30);
        assert!(budget.over());
        let waiting = budget.wait_under();
        tokio::pin!(waiting);
        assert!(futures_poll_once(waiting.as_mut()).is_pending());
        b.set(10);
        waiting.await;
        assert_eq!(budget.used(), 90);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    fn futures_poll_once<F: std::future::Future>(
        future: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        future.poll(&mut std::task::Context::from_waker(waker))
    }
}
