//! The store's requests to the API server, counted.

/// A store's requests to the API server, counted since it started (the
/// scale benchmark sums them over its simulated nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Writes the API server accepted.
    pub writes: u64,
    /// Writes it refused because the block had changed (409).
    pub conflicts: u64,
    /// Lists.
    pub lists: u64,
    /// Watches opened.
    pub watches: u64,
    /// Events those watches brought.
    pub watch_events: u64,
    /// ADDs served again: their write lost a race, or they waited for
    /// another node to lend.
    pub retries: u64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            writes: self.writes + o.writes,
            conflicts: self.conflicts + o.conflicts,
            lists: self.lists + o.lists,
            watches: self.watches + o.watches,
            watch_events: self.watch_events + o.watch_events,
            retries: self.retries + o.retries,
        }
    }
}
