//! Each open connection's metric labels, one shared copy per distinct label set.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::export::metrics::ConnLabels;

/// The label set of each connection (by cookie). Connections with the same labels share one
/// `Arc`, so the tick's gauges group connections by pointer and hash each set's strings once
/// a tick, not once per connection.
#[derive(Default)]
pub(super) struct LabelsByConn {
    by_cookie: FxHashMap<u64, Arc<ConnLabels>>,
    shared: FxHashSet<Arc<ConnLabels>>,
}

impl LabelsByConn {
    pub(super) fn insert(&mut self, cookie: u64, labels: ConnLabels) {
        let shared = match self.shared.get(&labels) {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(labels);
                self.shared.insert(shared.clone());
                shared
            }
        };
        if let Some(old) = self.by_cookie.insert(cookie, shared) {
            self.release(&old);
        }
    }

    pub(super) fn get(&self, cookie: u64) -> Option<&Arc<ConnLabels>> {
        self.by_cookie.get(&cookie)
    }

    pub(super) fn remove(&mut self, cookie: u64) -> Option<Arc<ConnLabels>> {
        let labels = self.by_cookie.remove(&cookie)?;
        self.release(&labels);
        Some(labels)
    }

    /// Drops the shared copy once no connection holds it: the set holds one, and the caller
    /// the one it just took from a connection.
    fn release(&mut self, labels: &Arc<ConnLabels>) {
        if Arc::strong_count(labels) == 2 {
            self.shared.remove(labels);
        }
    }

    #[cfg(test)]
    fn distinct(&self) -> usize {
        self.shared.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(comm: &str) -> ConnLabels {
        ConnLabels {
            comm: comm.into(),
            ..ConnLabels::overflow("client")
        }
    }

    #[test]
    fn equal_label_sets_share_one_copy_until_the_last_connection_goes() {
        let mut pool = LabelsByConn::default();
        pool.insert(1, labels("worker"));
        pool.insert(2, labels("worker"));
        pool.insert(3, labels("web"));
        assert_eq!(pool.distinct(), 2);
        let (one, two) = (pool.get(1).expect("1"), pool.get(2).expect("2"));
        assert!(Arc::ptr_eq(one, two));
        assert_eq!(pool.remove(1).as_deref(), Some(&labels("worker")));
        assert_eq!(
            pool.distinct(),
            2,
            "connection 2 still holds the worker set"
        );
        assert_eq!(pool.remove(2).as_deref(), Some(&labels("worker")));
        assert_eq!(pool.distinct(), 1);
        assert!(pool.remove(2).is_none());
        // A connection whose labels change (its owner was refreshed) lets the old set go.
        pool.insert(3, labels("web2"));
        assert_eq!(pool.distinct(), 1);
        assert_eq!(pool.get(3).map(|l| l.comm.as_str()), Some("web2"));
    }
}
