//! Where a CancelRequest goes. A client cancels a query by opening a new connection and
//! sending the key its backend gave it (BackendKeyData); only that backend can act on it. On a
//! leader listener the backend is the leader. On a replica listener it is whichever replica
//! the session was balanced to, so the key of every plaintext replica session is kept here,
//! with its backend's address, for as long as the session lasts.
//!
//! A key not found here (the session was TLS, went through another proxy, or was evicted) is
//! sent to every replica of the listener: Postgres ignores a key that is not its own. Never to
//! one guessed replica, which would lose the cancel silently.
//!
//! The map holds at most [`MAX_KEYS`] keys, the oldest evicted first: a flood of sessions
//! cannot grow it, and an evicted key still reaches its backend, among all the others.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use roleproxy_core::framing::BackendKey;

/// Keys kept at most: more than `proxy.max_connections` sessions open at once by default.
pub const MAX_KEYS: usize = 10_000;

/// Each plaintext replica session's key and its backend.
#[derive(Debug, Default)]
pub struct CancelKeys {
    keys: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    /// Key → backend, and when the key was added.
    by_key: HashMap<BackendKey, (SocketAddr, u64)>,
    /// When each key was added → the key, oldest first.
    by_age: BTreeMap<u64, BackendKey>,
    next: u64,
}

impl CancelKeys {
    pub fn new() -> Arc<CancelKeys> {
        Arc::default()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        // Every statement leaves the maps consistent: a panic elsewhere cannot corrupt them.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `key` for `backend`, evicting the oldest key when full.
    pub fn insert(&self, key: BackendKey, backend: SocketAddr) {
        let mut keys = self.keys();
        let at = keys.next;
        keys.next += 1;
        if let Some((_, old)) = keys.by_key.insert(key, (backend, at)) {
            keys.by_age.remove(&old);
        }
        keys.by_age.insert(at, key);
        while keys.by_key.len() > MAX_KEYS {
            let Some((_, oldest)) = keys.by_age.pop_first() else {
                break;
            };
            keys.by_key.remove(&oldest);
        }
    }

    /// Forgets `key` if it is still `backend`'s (its session ended).
    pub fn remove(&self, key: BackendKey, backend: SocketAddr) {
        let mut keys = self.keys();
        if let Some(&(addr, at)) = keys.by_key.get(&key) {
            if addr == backend {
                keys.by_key.remove(&key);
                keys.by_age.remove(&at);
            }
        }
    }

    /// The backend that issued `key`, if known.
    pub fn backend(&self, key: BackendKey) -> Option<SocketAddr> {
        self.keys().by_key.get(&key).map(|(addr, _)| *addr)
    }

    /// Keys kept now.
    pub fn len(&self) -> usize {
        self.keys().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps one session's key while the session lasts: given the key once its backend has sent
/// it ([`KeyRecorder::saw`]), forgets it when dropped.
pub struct KeyRecorder {
    keys: Arc<CancelKeys>,
    backend: SocketAddr,
    kept: Option<BackendKey>,
}

impl KeyRecorder {
    pub fn new(keys: Arc<CancelKeys>, backend: SocketAddr) -> KeyRecorder {
        KeyRecorder {
            keys,
            backend,
            kept: None,
        }
    }

    /// The session's key as known so far; kept the first time it is known.
    pub fn saw(&mut self, key: Option<BackendKey>) {
        if let (None, Some(key)) = (self.kept, key) {
            self.keys.insert(key, self.backend);
            self.kept = Some(key);
        }
    }
}

impl Drop for KeyRecorder {
    fn drop(&mut self) {
        if let Some(key) = self.kept {
            self.keys.remove(key, self.backend);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> BackendKey {
        BackendKey {
            process_id: n,
            secret_key: n.wrapping_mul(2_654_435_761),
        }
    }

    #[test]
    fn keys_are_kept_while_their_session_lasts() {
        let keys = CancelKeys::new();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.11:5433".parse().unwrap(),
            "127.0.0.12:5433".parse().unwrap(),
        );
        let mut session = KeyRecorder::new(Arc::clone(&keys), a);
        session.saw(None);
        assert!(keys.is_empty());
        session.saw(Some(key(1)));
        session.saw(Some(key(1)));
        assert_eq!(keys.backend(key(1)), Some(a));
        assert_eq!(keys.backend(key(2)), None);
        // The same key from another backend (process ids are per host): the newer one wins,
        // and the older session's end does not remove it.
        let mut other = KeyRecorder::new(Arc::clone(&keys), b);
        other.saw(Some(key(1)));
        drop(session);
        assert_eq!(keys.backend(key(1)), Some(b));
        drop(other);
        assert!(keys.is_empty());
    }

    #[test]
    fn the_oldest_keys_are_evicted_past_the_bound() {
        let keys = CancelKeys::new();
        let a: SocketAddr = "127.0.0.11:5433".parse().unwrap();
        for n in 0..(MAX_KEYS as u32 + 10) {
            keys.insert(key(n), a);
        }
        assert_eq!(keys.len(), MAX_KEYS);
        assert_eq!(keys.backend(key(9)), None, "among the oldest: evicted");
        assert_eq!(keys.backend(key(10)), Some(a));
        assert_eq!(keys.backend(key(MAX_KEYS as u32 + 9)), Some(a));
        assert_eq!(keys.keys().by_age.len(), MAX_KEYS);
    }
}
