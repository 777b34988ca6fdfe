//! The revoked task ids a worker remembers (Celery's `worker_state.revoked` and its state db):
//! a message of a revoked task that arrives later is marked REVOKED and not run.
//!
//! As in Celery, ids are forgotten after `EXPIRES` and at most `MAX` are kept, so the set stays
//! small however many tasks are revoked. The store keeps them too, so that a worker started
//! later (or again) knows the revokes of the last `EXPIRES`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// How long a revoke is remembered (Celery's `REVOKE_EXPIRES`, 3 hours).
pub const EXPIRES: chrono::Duration = chrono::Duration::hours(3);
/// At most this many revoked ids are remembered (Celery's `REVOKES_MAX`).
pub const MAX: usize = 50_000;

#[derive(Debug, Default)]
pub struct RevokedSet {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Id to when it was revoked.
    at: HashMap<String, DateTime<Utc>>,
    /// Ids in the order they were added (an id revoked again appears twice; the older entry is
    /// skipped when it comes to the front).
    order: VecDeque<(String, DateTime<Utc>)>,
}

impl RevokedSet {
    pub fn new() -> RevokedSet {
        RevokedSet::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `ids`, revoked at `at`.
    pub fn insert<'a>(&self, ids: impl IntoIterator<Item = &'a str>, at: DateTime<Utc>) {
        let mut inner = self.lock();
        for id in ids {
            let newer = inner.at.get(id).is_none_or(|old| *old < at);
            if newer {
                inner.at.insert(id.to_owned(), at);
                inner.order.push_back((id.to_owned(), at));
            }
        }
        inner.purge(Utc::now());
    }

    pub fn contains(&self, id: &str) -> bool {
        let inner = self.lock();
        inner
            .at
            .get(id)
            .is_some_and(|at| Utc::now() - *at < EXPIRES)
    }

    /// The remembered ids with when they were revoked, oldest first.
    pub fn entries(&self) -> Vec<(String, DateTime<Utc>)> {
        let mut inner = self.lock();
        inner.purge(Utc::now());
        let mut entries: Vec<_> = inner.at.iter().map(|(k, v)| (k.clone(), *v)).collect();
        entries.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        entries
    }

    pub fn len(&self) -> usize {
        self.lock().at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn purge(&mut self, now: DateTime<Utc>) {
        while let Some((id, at)) = self.order.front() {
            let current = self.at.get(id) == Some(at);
            let expired = now - *at >= EXPIRES;
            if !current {
                self.order.pop_front();
            } else if expired || self.at.len() > MAX {
                self.at.remove(id);
                self.order.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revokes_are_remembered_until_they_expire() {
        let set = RevokedSet::new();
        let now = Utc::now();
        set.insert(["old"], now - EXPIRES - chrono::Duration::seconds(1));
        set.insert(["a", "b"], now);
        assert!(!set.contains("old"));
        assert!(set.contains("a") && set.contains("b"));
        assert!(!set.contains("c"));
        let ids: Vec<_> = set.entries().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn a_revoke_again_keeps_the_later_time_and_the_set_stays_bounded() {
        let set = RevokedSet::new();
        let now = Utc::now();
        set.insert(["a"], now - chrono::Duration::hours(1));
        set.insert(["a"], now);
        assert_eq!(set.entries(), vec![("a".to_owned(), now)]);
        let many: Vec<String> = (0..MAX + 10).map(|i| format!("t{i}")).collect();
        set.insert(many.iter().map(String::as_str), now);
        assert_eq!(set.len(), MAX);
        assert!(!set.contains("a"), "the oldest ids go first");
        assert!(set.contains(&format!("t{}", MAX + 9)));
    }
}
