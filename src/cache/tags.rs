//! Tag versions: how a write makes stored entries stale without finding
//! them. Every invalidation gives each tag it names the next value of one
//! counter (the generation). An entry remembers the generation when its
//! fetch began and each of its tags' versions; it is served only while
//! those versions are unchanged. A tag bumped after the fetch began has a
//! version above that generation, so a response fetched before a write and
//! stored after it is never stored at all. Versioned keys instead of
//! scanning the cache for matches (moka predicates pile up, spiceai #11077).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tags remembered at most; past this the older half is forgotten.
const MAX_TAGS: usize = 1 << 16;

pub struct TagVersions {
    generation: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    versions: HashMap<String, u64>,
    /// Soft purges: entries carrying these stay, but count as stale (they
    /// are revalidated, and may still stand in for an error).
    soft: HashMap<String, u64>,
    /// Entries whose fetch began before this generation may depend on a
    /// forgotten version: none of them is served.
    floor: u64,
    /// Set when the invalidation channel is followed again after messages
    /// may have been missed: entries whose fetch began before the first
    /// generation are gone, unless it began at or after the second, Redis's
    /// generation then (no message they could have missed was newer).
    resync: (u64, u64),
}

/// What an entry remembers of the tags at its fetch: per tag, its version
/// and its soft-purge version.
#[derive(Debug, Clone, Default)]
pub struct Stamp {
    pub generation: u64,
    pub versions: Vec<(String, u64, u64)>,
    /// Redis's generation read before the fetch began, when it answered.
    pub redis: Option<u64>,
}

/// Whether an entry may still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Current,
    /// Soft-purged: usable only as a stale response.
    Stale,
    Gone,
}

impl Default for TagVersions {
    fn default() -> Self {
        TagVersions {
            generation: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
        }
    }
}

impl TagVersions {
    /// The generation now, read before a fetch begins.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The stamp for an entry whose fetch began at `since` (and at Redis's
    /// generation `redis`); `None` when one of `tags` was invalidated after
    /// that (the response may be older than the write).
    pub fn stamp(&self, since: u64, redis: Option<u64>, tags: Vec<String>) -> Option<Stamp> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.dropped(since, redis) {
            return None;
        }
        let mut versions = Vec::with_capacity(tags.len());
        for tag in tags {
            let version = inner.versions.get(&tag).copied().unwrap_or(0);
            let soft = inner.soft.get(&tag).copied().unwrap_or(0);
            if version > since || soft > since {
                return None;
            }
            versions.push((tag, version, soft));
        }
        Some(Stamp {
            generation: since,
            versions,
            redis,
        })
    }

    /// Whether no tag of the entry was invalidated since its fetch.
    #[cfg(test)]
    fn current(&self, stamp: &Stamp) -> bool {
        self.validity(stamp) == Validity::Current
    }

    /// What the invalidations since the entry's fetch left of it.
    pub fn validity(&self, stamp: &Stamp) -> Validity {
        // Nothing at all was invalidated since: no need to look.
        if self.generation.load(Ordering::Acquire) == stamp.generation {
            return Validity::Current;
        }
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.dropped(stamp.generation, stamp.redis) {
            return Validity::Gone;
        }
        let mut validity = Validity::Current;
        for (tag, version, soft) in &stamp.versions {
            if inner.versions.get(tag).copied().unwrap_or(0) != *version {
                return Validity::Gone;
            }
            if inner.soft.get(tag).copied().unwrap_or(0) != *soft {
                validity = Validity::Stale;
            }
        }
        validity
    }

    /// Invalidate `tags`: entries carrying any of them are gone from now.
    pub fn bump<'a>(&self, tags: impl IntoIterator<Item = &'a str>) {
        self.bump_in(tags, false);
    }

    /// Invalidate `tags`; `soft`: entries carrying them stay, stale.
    pub fn bump_in<'a>(&self, tags: impl IntoIterator<Item = &'a str>, soft: bool) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        let mut generation = self.generation.load(Ordering::Acquire);
        let map = if soft {
            &mut inner.soft
        } else {
            &mut inner.versions
        };
        for tag in tags {
            generation += 1;
            map.insert(tag.to_string(), generation);
        }
        for map in [&mut inner.versions, &mut inner.soft] {
            if map.len() > MAX_TAGS {
                let mut all: Vec<u64> = map.values().copied().collect();
                let middle = all.len() / 2;
                let (_, cut, _) = all.select_nth_unstable(middle);
                let cut = *cut;
                map.retain(|_, v| *v > cut);
                // An entry fetched before `cut` may have read a version now
                // forgotten (read back as 0): it is not served again.
                inner.floor = inner.floor.max(cut);
            }
        }
        self.generation.store(generation, Ordering::Release);
    }

    /// Forget every entry: all fetched before now are gone.
    pub fn bump_all(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation.load(Ordering::Acquire) + 1;
        inner.versions.clear();
        inner.soft.clear();
        inner.floor = generation;
        self.generation.store(generation, Ordering::Release);
    }

    /// Forget every entry fetched before now, except those whose fetch
    /// began at or after Redis's generation `redis`: invalidations up to it
    /// may have been missed, and they are the ones that saw them all.
    pub fn resync(&self, redis: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation.load(Ordering::Acquire) + 1;
        inner.resync = (generation, redis);
        self.generation.store(generation, Ordering::Release);
    }
}

impl Inner {
    /// Whether a fetch that began at `since` (Redis: `redis`) was dropped
    /// whole, whatever its tags.
    fn dropped(&self, since: u64, redis: Option<u64>) -> bool {
        let (resynced, from) = self.resync;
        self.floor > since || (resynced > since && redis.is_none_or(|r| r < from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_makes_older_stamps_stale_and_leaves_others() {
        let tags = TagVersions::default();
        let g = tags.generation();
        let a = tags.stamp(g, None, vec!["stories".into()]).unwrap();
        let b = tags.stamp(g, None, vec!["users".into()]).unwrap();
        assert!(tags.current(&a) && tags.current(&b));
        tags.bump(["stories"]);
        assert!(!tags.current(&a));
        assert!(tags.current(&b));
        // Fetched after the write: fine.
        let c = tags
            .stamp(tags.generation(), None, vec!["stories".into()])
            .unwrap();
        assert!(tags.current(&c));
    }

    #[test]
    fn a_fetch_that_raced_a_write_is_not_stored() {
        let tags = TagVersions::default();
        let began = tags.generation();
        tags.bump(["stories"]);
        assert!(tags.stamp(began, None, vec!["stories".into()]).is_none());
        assert!(tags.stamp(began, None, vec!["users".into()]).is_some());
    }

    #[test]
    fn forgetting_old_versions_never_revives_an_entry() {
        let tags = TagVersions::default();
        let old = tags
            .stamp(tags.generation(), None, vec!["t0".into()])
            .unwrap();
        tags.bump(["t0"]);
        for i in 1..=MAX_TAGS + 1 {
            tags.bump([format!("t{i}").as_str()]);
        }
        // `t0`'s version was forgotten; the stamp that read 0 must not match.
        assert!(!tags.current(&old));
        let fresh = tags
            .stamp(tags.generation(), None, vec!["t0".into()])
            .unwrap();
        assert!(tags.current(&fresh));
    }

    #[test]
    fn a_soft_purge_leaves_entries_stale_not_gone() {
        let tags = TagVersions::default();
        let a = tags
            .stamp(tags.generation(), None, vec!["stories".into()])
            .unwrap();
        tags.bump_in(["stories"], true);
        assert_eq!(tags.validity(&a), Validity::Stale);
        tags.bump(["stories"]);
        assert_eq!(tags.validity(&a), Validity::Gone);
        // Stored again after the purge: current.
        let b = tags
            .stamp(tags.generation(), None, vec!["stories".into()])
            .unwrap();
        assert_eq!(tags.validity(&b), Validity::Current);
    }

    #[test]
    fn bump_all_stales_everything() {
        let tags = TagVersions::default();
        let a = tags.stamp(tags.generation(), None, vec![]).unwrap();
        tags.bump_all();
        assert!(!tags.current(&a));
    }

    #[test]
    fn a_resync_keeps_only_fetches_that_began_at_or_after_its_redis_generation() {
        let tags = TagVersions::default();
        let g = tags.generation();
        let behind = tags.stamp(g, Some(6), vec!["a".into()]).unwrap();
        let level = tags.stamp(g, Some(7), vec!["a".into()]).unwrap();
        let unknown = tags.stamp(g, None, vec!["a".into()]).unwrap();
        tags.resync(7);
        assert_eq!(tags.validity(&behind), Validity::Gone);
        assert_eq!(tags.validity(&unknown), Validity::Gone);
        assert_eq!(tags.validity(&level), Validity::Current);
        // Fetches in flight across the resync: stored only if level with it.
        assert!(tags.stamp(g, Some(6), vec!["b".into()]).is_none());
        assert!(tags.stamp(g, Some(7), vec!["b".into()]).is_some());
        // Tag invalidations still apply to what the resync kept.
        tags.bump(["a"]);
        assert_eq!(tags.validity(&level), Validity::Gone);
        // And a later drop of everything leaves nothing.
        let after = tags.stamp(tags.generation(), Some(7), vec![]).unwrap();
        tags.bump_all();
        assert_eq!(tags.validity(&after), Validity::Gone);
    }
}
