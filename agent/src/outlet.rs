//! One-way connections between actors, made in one place (`daemon.rs`).
//!
//! An actor that tells another one something (pressure began, a pass finished, a new
//! desired set) holds an [`Outlet`] for it instead of the other actor's address. The
//! sender then imports nothing of the receiver, and `daemon.rs` shows every connection:
//! `Outlet::new(move |report| reporter.do_send(PassDone(report)))`.
//!
//! Requests that need an answer (a snapshot of the inventory, a destroy) still go through
//! the receiver's address and the message declared beside it.

use std::fmt;
use std::sync::Arc;

/// Where an actor sends values of `T`; cheap to clone.
pub struct Outlet<T>(Arc<dyn Fn(T) + Send + Sync>);

impl<T> Outlet<T> {
    pub fn new(f: impl Fn(T) + Send + Sync + 'static) -> Self {
        Outlet(Arc::new(f))
    }

    /// An outlet that drops what it is given (tests, and parts not started).
    pub fn nowhere() -> Self {
        Outlet(Arc::new(|_| {}))
    }

    pub fn send(&self, value: T) {
        (self.0)(value)
    }
}

impl<T> Clone for Outlet<T> {
    fn clone(&self) -> Self {
        Outlet(Arc::clone(&self.0))
    }
}

impl<T> fmt::Debug for Outlet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Outlet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn an_outlet_hands_each_value_to_its_receiver_and_clones_share_it() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let out = Outlet::new(move |v: u32| sink.lock().expect("lock").push(v));
        out.send(1);
        out.clone().send(2);
        Outlet::<u32>::nowhere().send(3);
        assert_eq!(*got.lock().expect("lock"), vec![1, 2]);
    }
}
