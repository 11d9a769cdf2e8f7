//! Destroyed handles waiting for a report that carries them to be accepted.

use std::collections::HashSet;

use protocol::Handle;

/// In the order they were destroyed (children first), without repeats. Adding and
/// acknowledging are linear in what they are given: a pass that destroys a released
/// pipeline's 100,000 volumes must not stall the reporter's event loop.
#[derive(Debug, Default, Clone)]
pub struct Pending {
    order: Vec<Handle>,
    seen: HashSet<Handle>,
}

impl Pending {
    /// Adds `handle` unless it is already waiting.
    pub fn add(&mut self, handle: Handle) {
        if self.seen.insert(handle.clone()) {
            self.order.push(handle);
        }
    }

    /// What the next report carries.
    pub fn to_vec(&self) -> Vec<Handle> {
        self.order.clone()
    }

    /// A report carrying `sent` was accepted: those wait no longer. Handles added since
    /// that report was built stay.
    pub fn acknowledge(&mut self, sent: &[Handle]) {
        let sent: HashSet<&Handle> = sent.iter().collect();
        self.order.retain(|h| !sent.contains(h));
        self.seen.retain(|h| !sent.contains(h));
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Handle {
        Handle::new(s.to_string()).expect("handle")
    }

    #[test]
    fn keeps_destroy_order_without_repeats_until_a_report_carrying_them_is_accepted() {
        let mut p = Pending::default();
        for x in ["child", "parent", "child", "other"] {
            p.add(h(x));
        }
        let sent = p.to_vec();
        assert_eq!(sent, vec![h("child"), h("parent"), h("other")]);
        // Destroyed while that report was on its way: stays for the next one.
        p.add(h("late"));
        p.acknowledge(&sent);
        assert_eq!(p.to_vec(), vec![h("late")]);
        // Once acknowledged, a handle can wait again (destroyed again after a restore).
        p.add(h("child"));
        assert_eq!(p.len(), 2);
        p.acknowledge(&p.to_vec());
        assert!(p.is_empty());
    }

    #[test]
    fn a_hundred_thousand_destroys_are_added_and_acknowledged_in_one_go() {
        let mut p = Pending::default();
        let all: Vec<Handle> = (0..100_000).map(|i| h(&format!("v{i}"))).collect();
        for x in &all {
            p.add(x.clone());
        }
        assert_eq!(p.len(), all.len());
        p.acknowledge(&all);
        assert!(p.is_empty());
    }
}
