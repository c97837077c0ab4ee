//! A hash map whose copies share what they did not change.
//!
//! The desired state is published as a new snapshot per change while connections keep reading
//! older ones. Copying every map of a 10k-Service state for a one-object change costs
//! milliseconds and doubles memory while both copies live; instead each map is split into
//! shards behind `Arc`s. A copy clones [`SHARDS`] pointers; a change clones only the shard it
//! touches (about `len / SHARDS` entries). Lookups cost one extra hash of the key.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    sync::Arc,
};

/// Shards per map: at 50k entries a change copies about 200 of them.
pub const SHARDS: usize = 256;

#[derive(Debug, Clone)]
pub struct SharedMap<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
    /// Picks the shard of a key (the shards' own hashers differ; this one is shared by every
    /// copy of the map).
    hasher: RandomState,
    len: usize,
}

impl<K, V> Default for SharedMap<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SharedMap<K, V> {
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The low bits of SipHash are as good as any.
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards.get(self.shard(key))?.get(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.shard(&key);
        let shard = Arc::make_mut(self.shards.get_mut(i)?);
        let old = shard.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(key);
        let slot = self.shards.get_mut(i)?;
        // Only a shard that holds the key is copied.
        if !slot.contains_key(key) {
            return None;
        }
        let old = Arc::make_mut(slot).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    /// How many shards this map shares with `other` (a test of the sharing, and a figure).
    pub fn shared_shards(&self, other: &Self) -> usize {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_share_untouched_shards() {
        let mut a = SharedMap::default();
        for i in 0..10_000u32 {
            a.insert(i, i * 2);
        }
        let mut b = a.clone();
        assert_eq!(b.insert(7, 0), Some(14));
        assert_eq!(b.remove(&8), Some(16));
        assert_eq!(b.remove(&10_001), None);
        assert_eq!((a.len(), b.len()), (10_000, 9_999));
        assert_eq!(
            (a.get(&7), b.get(&7), b.get(&8)),
            (Some(&14), Some(&0), None)
        );
        // Two keys changed: at most two shards copied.
        assert!(a.shared_shards(&b) >= SHARDS - 2);
        assert_eq!(b.iter().count(), 9_999);
    }
}
