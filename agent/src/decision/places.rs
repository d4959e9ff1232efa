//! How many connections the decision API holds, and for whom: a count per key (the uid on
//! the socket, the SPIFFE ID on TCP), and the TLS handshakes in progress on TCP, where a
//! newcomer takes the place of the oldest.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::oneshot;

/// Connections per key at once, at most `max` each.
#[derive(Debug)]
pub(super) struct PerKey<K: Hash + Eq + Clone> {
    max: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// One connection's place in its key's count, given back when dropped.
#[derive(Debug)]
pub(super) struct KeySlot<K: Hash + Eq + Clone>(Arc<PerKey<K>>, K);

impl<K: Hash + Eq + Clone> PerKey<K> {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection of `key`, or `None` if it holds `max`.
    pub(super) fn take(self: &Arc<Self>, key: &K) -> Option<KeySlot<K>> {
        let mut m = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeySlot(Arc::clone(self), key.clone()))
    }
}

impl<K: Hash + Eq + Clone> Drop for KeySlot<K> {
    fn drop(&mut self) {
        let mut m = (self.0).held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// The TLS handshakes in progress, oldest first, at most `max`. A connection that comes
/// when all places are taken ends the oldest handshake and takes its place: clients that
/// connect and say nothing cannot keep out the agents that prove who they are (each
/// handshake has a few seconds; refusing newcomers let a few silent connections, renewed
/// as they timed out, shut the address to everyone).
#[derive(Debug)]
pub(super) struct Handshakes {
    max: usize,
    pending: Mutex<Pending>,
}

/// The next handshake's number, and the handshakes in progress, oldest first: each number
/// with the sender whose drop ends it.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// One handshake's place; given back when dropped. Its `ended` resolves when a newcomer
/// took the place.
#[derive(Debug)]
pub(super) struct Handshake {
    set: Arc<Handshakes>,
    id: u64,
    pub(super) ended: oneshot::Receiver<()>,
}

impl Handshakes {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// A place for a new handshake, and whether an older one was ended for it.
    pub(super) fn begin(self: &Arc<Self>) -> (Handshake, bool) {
        let (tx, ended) = oneshot::channel();
        let mut g = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let id = g.next;
        g.next += 1;
        // Dropping the sender wakes the oldest handshake's `ended`.
        let evicted = g.queue.len() >= self.max && g.queue.pop_front().is_some();
        g.queue.push_back((id, tx));
        drop(g);
        let place = Handshake {
            set: Arc::clone(self),
            id,
            ended,
        };
        (place, evicted)
    }

    #[cfg(test)]
    fn in_progress(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .len()
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut g = self
            .set
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.queue.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_places_and_gets_them_back() {
        let p = PerKey::new(2);
        let a = p.take(&"a").unwrap();
        let _b = p.take(&"a").unwrap();
        assert!(p.take(&"a").is_none());
        assert!(p.take(&"b").is_some(), "another key has places of its own");
        drop(a);
        assert!(p.take(&"a").is_some());
    }

    #[test]
    fn a_newcomer_ends_the_oldest_handshake_when_all_places_are_taken() {
        let h = Handshakes::new(2);
        let (mut first, e1) = h.begin();
        let (mut second, e2) = h.begin();
        assert!(!e1 && !e2);
        assert!(
            first
                .ended
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        let (third, e3) = h.begin();
        assert!(e3, "the oldest made room");
        assert_eq!(
            first.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest is told"
        );
        assert_eq!(
            second.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(h.in_progress(), 2);
        drop(first);
        assert_eq!(h.in_progress(), 2, "an ended handshake holds no place");
        drop((second, third));
        assert_eq!(h.in_progress(), 0);
    }
}
