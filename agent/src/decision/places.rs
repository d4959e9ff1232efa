//! How many connections the decision API holds, and for whom: a count per key (the uid on
//! the socket, the SPIFFE ID on TCP), and on TCP the handshakes in progress and the
//! connections held, where a newcomer takes a place from the busiest ([`Displacing`]).

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

/// Where a connection comes from: the cgroup of the process that opened it (on this host),
/// or its address (elsewhere, or when the host cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Cgroup(u64),
    Address(std::net::IpAddr),
}

/// Places that a newcomer takes from the busiest: at most `max` held, oldest first. One that
/// comes when all are taken ends the oldest of the key that holds the most places (of keys
/// holding as many, the one whose oldest place is oldest), and takes its place.
///
/// The TLS handshakes in progress are keyed by [`Source`]: clients that connect and say
/// nothing, or connect and go as fast as they can, end their own handshakes, not those of
/// agents that prove who they are. (Refusing newcomers let a few silent connections shut the
/// address; ending the oldest of all let a flood of connects end every agent's handshake.)
/// The connections of verified clients are keyed by SPIFFE ID: a few identities that hold
/// every connection give one up to an identity that holds none.
#[derive(Debug)]
pub(super) struct Displacing<K> {
    max: usize,
    held: Mutex<Held<K>>,
}

/// The next place's number, and the places held, oldest first: each number with its key and
/// the sender whose drop ends it.
#[derive(Debug)]
struct Held<K> {
    next: u64,
    queue: VecDeque<(u64, K, oneshot::Sender<()>)>,
}

impl<K: Hash + Eq + Clone> Held<K> {
    /// Ends the oldest place of the key that holds the most; whether one was.
    fn end_one(&mut self) -> bool {
        let mut held: HashMap<&K, usize> = HashMap::new();
        for (_, key, _) in &self.queue {
            *held.entry(key).or_default() += 1;
        }
        let most = held.values().copied().max().unwrap_or(0);
        let Some(at) = self
            .queue
            .iter()
            .position(|(_, key, _)| held.get(key) == Some(&most))
        else {
            return false;
        };
        // Dropping the sender wakes that place's `ended`.
        self.queue.remove(at).is_some()
    }
}

/// One place; given back when dropped. Its `ended` resolves when a newcomer took it.
#[derive(Debug)]
pub(super) struct Place<K: Hash + Eq + Clone> {
    set: Arc<Displacing<K>>,
    id: u64,
    pub(super) ended: oneshot::Receiver<()>,
}

impl<K: Hash + Eq + Clone> Displacing<K> {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            held: Mutex::new(Held {
                next: 0,
                queue: VecDeque::new(),
            }),
        })
    }

    /// A place for `key`, and whether another was ended for it.
    pub(super) fn take(self: &Arc<Self>, key: K) -> (Place<K>, bool) {
        let (tx, ended) = oneshot::channel();
        let mut g = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let id = g.next;
        g.next += 1;
        let displaced = g.queue.len() >= self.max && g.end_one();
        g.queue.push_back((id, key, tx));
        drop(g);
        let place = Place {
            set: Arc::clone(self),
            id,
            ended,
        };
        (place, displaced)
    }

    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut g = self.set.held.lock().unwrap_or_else(PoisonError::into_inner);
        g.queue.retain(|(id, _, _)| *id != self.id);
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
    fn a_newcomer_ends_the_oldest_handshake_of_the_source_that_holds_the_most() {
        let (agent, flood) = (Source::Cgroup(7), Source::Cgroup(9));
        let h = Displacing::new(3);
        let (mut first, e1) = h.take(agent);
        let (mut second, e2) = h.take(flood);
        let (mut third, e3) = h.take(flood);
        assert!(!e1 && !e2 && !e3);
        assert_eq!(
            first.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // The flood holds two places: its oldest goes, whoever comes.
        let (mut fourth, e4) = h.take(agent);
        assert!(e4, "room was made");
        assert_eq!(
            second.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the flood's oldest is told"
        );
        assert_eq!(
            first.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(h.in_use(), 3);
        // Now the agent holds two places and the flood one: the agent's oldest goes.
        let (_fifth, e5) = h.take(flood);
        assert!(e5);
        assert_eq!(
            first.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the source with the most places gives one up"
        );
        assert_eq!(
            third.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(
            fourth.ended.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        drop((first, second));
        assert_eq!(h.in_use(), 3, "an ended handshake holds no place");
        drop((third, fourth));
        assert_eq!(h.in_use(), 1);
    }
}
