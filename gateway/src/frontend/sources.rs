//! Connections per source address: one host may hold at most
//! `server.max_connections_per_source` connections of a listener, so it
//! cannot take every place of `server.max_connections` (3,000 idle TCP
//! connections from one client used to make every other client get 503).
//!
//! Each listener has its own [`SourceLimit`]; a connection holds a
//! [`SourceSlot`] for its whole life, and dropping it gives the place back.
//! The map holds one entry per address with a connection open, so it is
//! bounded by the listener's `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The connections each source address holds on one listener.
#[derive(Debug)]
pub struct SourceLimit {
    limit: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

impl SourceLimit {
    /// At most `limit` connections per address (0 is taken as 1).
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(SourceLimit {
            limit: limit.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, or `None` when that
    /// address already holds the limit. IPv4-mapped IPv6 addresses count as
    /// their IPv4 address.
    pub fn try_hold(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        // A panic while the lock was held cannot leave a count half-written:
        // the map is updated in one statement.
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> u32 {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    /// The per-address limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }
}

/// One connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct SourceSlot {
    owner: Arc<SourceLimit>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self
            .owner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_places_and_a_dropped_slot_frees_one() {
        let limit = SourceLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().expect("an address");
        let b: IpAddr = "10.0.0.2".parse().expect("an address");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("an address");
        let first = limit.try_hold(a);
        let second = limit.try_hold(mapped);
        assert!(first.is_some() && second.is_some());
        assert!(limit.try_hold(a).is_none(), "a third from the same host");
        assert!(limit.try_hold(b).is_some(), "another host is not affected");
        drop(first);
        assert_eq!(limit.held(a), 1);
        let third = limit.try_hold(a);
        assert!(third.is_some());
        drop(second);
        drop(third);
        assert_eq!(limit.held(a), 0);
        assert!(limit.held.lock().expect("not poisoned").is_empty());
    }
}
