//! Item positions by id, without a second copy of every id: the index maps
//! a hash of the id to the item's position and checks the id against the
//! item itself. An id whose hash another id already holds (rare) is kept
//! in full in a small side map.

use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault};

use crate::fast_hash::{FastHasher, FastMap};

/// Item positions by id. The caller supplies the id at a position when one
/// must be compared (`id_at`), as the items themselves hold them.
#[derive(Debug)]
pub(super) struct IdIndex {
    by_hash: FastMap<u64, u32>,
    /// Ids whose hash another id holds in `by_hash`.
    collided: FastMap<Box<str>, u32>,
    hash: fn(&str) -> u64,
}

impl Default for IdIndex {
    fn default() -> Self {
        IdIndex::with_hash(|id| BuildHasherDefault::<FastHasher>::default().hash_one(id))
    }
}

impl IdIndex {
    fn with_hash(hash: fn(&str) -> u64) -> Self {
        IdIndex {
            by_hash: FastMap::default(),
            collided: FastMap::default(),
            hash,
        }
    }

    /// The position of `id`.
    pub(super) fn get<'a>(&self, id: &str, id_at: impl Fn(usize) -> &'a str) -> Option<usize> {
        match self.by_hash.get(&(self.hash)(id)) {
            Some(&position) if id_at(position as usize) == id => Some(position as usize),
            Some(_) => self.collided.get(id).map(|&p| p as usize),
            None => None,
        }
    }

    /// Records that `id`, not yet in the index, is at `position` (which
    /// fits in `u32`: [`super::MAX_ITEMS`]).
    pub(super) fn insert(&mut self, id: &str, position: usize) {
        let position = position as u32;
        match self.by_hash.entry((self.hash)(id)) {
            Entry::Vacant(slot) => {
                slot.insert(position);
            }
            Entry::Occupied(_) => {
                self.collided.insert(id.into(), position);
            }
        }
    }

    /// Forgets `id`, which is at `position`.
    pub(super) fn remove(&mut self, id: &str, position: usize) {
        if self.collided.remove(id).is_some() {
            return;
        }
        let key = (self.hash)(id);
        if self.by_hash.get(&key) != Some(&(position as u32)) {
            return;
        }
        self.by_hash.remove(&key);
        // An id that collided with this one takes its place.
        let hash = self.hash;
        let heir = self
            .collided
            .keys()
            .find(|other| hash(other) == key)
            .cloned();
        if let Some(heir) = heir
            && let Some(p) = self.collided.remove(&heir)
        {
            self.by_hash.insert(key, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(index: &IdIndex, ids: &[&str], gone: &[&str]) {
        let at = |p: usize| ids[p];
        for (position, id) in ids.iter().enumerate() {
            if gone.contains(id) {
                assert_eq!(index.get(id, at), None, "{id} was removed");
            } else {
                assert_eq!(index.get(id, at), Some(position), "{id}");
            }
        }
        assert_eq!(index.get("never-stored", at), None);
    }

    #[test]
    fn ids_are_found_at_their_positions_until_removed() {
        let owned: Vec<String> = (0..1000).map(|i| format!("item-{i}")).collect();
        let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
        let mut index = IdIndex::default();
        for (position, id) in ids.iter().enumerate() {
            index.insert(id, position);
        }
        assert!(index.collided.is_empty());
        check(&index, &ids, &[]);
        index.remove("item-7", 7);
        check(&index, &ids, &["item-7"]);
    }

    #[test]
    fn ids_with_one_hash_are_told_apart_and_survive_each_others_removal() {
        // Every id of a length hashes alike: "aa", "bb" and "cc" collide.
        let ids = ["aa", "bb", "cc", "d"];
        let mut index = IdIndex::with_hash(|id| id.len() as u64);
        for (position, id) in ids.iter().enumerate() {
            index.insert(id, position);
        }
        assert_eq!(index.collided.len(), 2);
        check(&index, &ids, &[]);
        // The id holding the slot goes: a collided one inherits it.
        index.remove("aa", 0);
        assert_eq!(index.collided.len(), 1);
        check(&index, &ids, &["aa"]);
        index.remove("cc", 2);
        check(&index, &ids, &["aa", "cc"]);
        index.remove("bb", 1);
        check(&index, &ids, &["aa", "bb", "cc"]);
        assert!(index.collided.is_empty() && index.by_hash.len() == 1);
    }
}
