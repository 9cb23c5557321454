//! What one node knows of a pool's blocks: the blocks as last read, its
//! changes not yet written (a delta per block), and the geometry of the
//! search for a block (where each node starts, in what order it walks).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::{BlockSpec, Claim, RailBlock};
use crate::ipam::{AllocationKey, Family, Pool, pool};

/// Blocks of one pool as last seen, by name, with this node's changes not
/// yet written.
#[derive(Default)]
pub(super) struct Blocks {
    /// The cache may be handed out from: read since start, and not in
    /// doubt since (a write whose outcome is unknown clears it).
    pub(super) listed: bool,
    /// `by_name` came from a list of the whole pool (else only this
    /// node's blocks and those it met since were read: at a job launch
    /// on many nodes, every node listing every block of every pool is
    /// what grows with the square of the nodes).
    pub(super) complete: bool,
    /// Anything of the pool was read since start.
    pub(super) read: bool,
    /// When the whole pool was last listed.
    pub(super) listed_at: Option<Instant>,
    /// As the API server last returned them.
    pub(super) by_name: BTreeMap<String, RailBlock>,
    /// Own blocks: claims made and released locally, for the next flush.
    pub(super) delta: BTreeMap<String, Delta>,
    /// Own blocks found with no claim, since when.
    pub(super) empty_since: BTreeMap<String, Instant>,
    /// Own blocks whose unused held addresses another node asked for.
    pub(super) lend: BTreeSet<String>,
    /// Own blocks a write in flight changes the held set of (lending or
    /// deleting): nothing is handed out from them meanwhile.
    pub(super) busy: BTreeSet<String>,
    /// Nodes have had to lend in this pool: releases are written at once
    /// (and give the address up), so another node sees them free.
    pub(super) tight: bool,
}

/// One own block's unwritten changes.
#[derive(Clone, Default, PartialEq)]
pub(super) struct Delta {
    /// Claims made from held addresses.
    pub(super) adds: BTreeMap<String, Claim>,
    /// Claims released: address → (container ID, interface) whose claim it
    /// was (removed only while it still is).
    pub(super) removes: BTreeSet<Release>,
}

/// A claim released: (address, container ID, interface). Keyed by all
/// three, not by the address: an address released and handed out again
/// before the next flush has two changes to write — the old claim's
/// removal and the new claim — and the new one released too makes a
/// third (a job launch whose pods failed and were retried lost the first
/// removal when releases were keyed by address, leaking the claim).
pub(super) type Release = (String, String, String);

impl Delta {
    pub(super) fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.removes.is_empty()
    }

    /// Whether stored claim `c` at `address` is released here.
    pub(super) fn releases(&self, address: &str, c: &Claim) -> bool {
        self.removes.iter().any(|(a, cid, ifname)| {
            a == address && cid == &c.container_id && ifname == &c.interface
        })
    }

    /// Releases `who`'s claim at `address` (unwritten or stored).
    pub(super) fn release(&mut self, address: &str, who: (String, String)) {
        if self
            .adds
            .get(address)
            .is_some_and(|c| c.container_id == who.0 && c.interface == who.1)
        {
            self.adds.remove(address);
        }
        self.removes.insert((address.to_owned(), who.0, who.1));
    }

    /// `spec` with these changes made. A claim of ours at an address
    /// another attachment already claims in `spec` is not made: it never
    /// replaces theirs. Returns those addresses (the caller says so
    /// loudly: two pods were given one address).
    pub(super) fn apply(&self, spec: &mut BlockSpec) -> Vec<String> {
        for (a, cid, ifname) in &self.removes {
            if spec
                .claims
                .get(a)
                .is_some_and(|c| &c.container_id == cid && &c.interface == ifname)
            {
                spec.claims.remove(a);
            }
        }
        let mut refused = Vec::new();
        for (a, c) in &self.adds {
            match spec.claims.get(a) {
                Some(theirs)
                    if theirs.container_id != c.container_id || theirs.interface != c.interface =>
                {
                    refused.push(a.clone());
                }
                _ => {
                    spec.claims.insert(a.clone(), c.clone());
                }
            }
        }
        refused
    }

    /// Forgets the changes of `written` that are still as they were (a
    /// change made since stays for the next write).
    pub(super) fn subtract(&mut self, written: &Delta) {
        for (a, c) in &written.adds {
            if self.adds.get(a) == Some(c) {
                self.adds.remove(a);
            }
        }
        for r in &written.removes {
            self.removes.remove(r);
        }
    }
}

impl Blocks {
    /// Who holds `address` in block `name`, unwritten changes included.
    pub(super) fn claim(&self, name: &str, address: &str) -> Option<&Claim> {
        let stored = self.by_name.get(name)?.spec.claims.get(address);
        let Some(d) = self.delta.get(name) else {
            return stored;
        };
        if let Some(c) = d.adds.get(address) {
            return Some(c);
        }
        stored.filter(|c| !d.releases(address, c))
    }

    /// Every claim of block `name`, unwritten changes included (what
    /// `claims_in` counts).
    #[cfg(test)]
    pub(super) fn claims(&self, name: &str) -> BTreeMap<String, Claim> {
        let Some(b) = self.by_name.get(name) else {
            return BTreeMap::new();
        };
        let mut spec = b.spec.clone();
        if let Some(d) = self.delta.get(name) {
            // The clashes it returns are said where the write is made.
            let _ = d.apply(&mut spec);
        }
        spec.claims
    }

    /// How many claims block `name` has, unwritten changes included: what
    /// `claims(name).len()` says, without copying them (the flush asks of
    /// every own block every 200 ms).
    pub(super) fn claims_in(&self, name: &str) -> usize {
        let Some(b) = self.by_name.get(name) else {
            return 0;
        };
        let Some(d) = self.delta.get(name) else {
            return b.spec.claims.len();
        };
        let kept = b
            .spec
            .claims
            .iter()
            .filter(|(a, c)| !d.adds.contains_key(*a) && !d.releases(a, c))
            .count();
        kept + d.adds.len()
    }

    /// The block and address `key` holds, if any.
    pub(super) fn find(&self, key: &AllocationKey) -> Option<(String, IpAddr)> {
        let v6 = key.family == Family::V6;
        let matches = |a: &str, c: &Claim| {
            c.container_id == key.container_id
                && c.interface == key.ifname
                && a.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6() == v6)
        };
        for (name, d) in &self.delta {
            if let Some((a, _)) = d.adds.iter().find(|(a, c)| matches(a, c)) {
                return a.parse().ok().map(|a| (name.clone(), a));
            }
        }
        self.by_name.iter().find_map(|(name, b)| {
            b.spec.claims.iter().find_map(|(a, c)| {
                if matches(a, c) && self.claim(name, a) == Some(c) {
                    Some((name.clone(), a.parse().ok()?))
                } else {
                    None
                }
            })
        })
    }

    /// The lowest address of block `name` the pool hands out, nobody
    /// claims, and that is held (or not held, with `held` false).
    pub(super) fn free(&self, pool: &Pool, name: &str, held: bool) -> Option<IpAddr> {
        if held && self.busy.contains(name) {
            return None;
        }
        let b = self.by_name.get(name)?;
        let net: IpNet = b.spec.cidr.parse().ok()?;
        let (lo, hi) = (pool::num(net.network()), pool::num(net.broadcast()));
        (lo..=hi).map(|n| pool::addr(pool.is_v6(), n)).find(|a| {
            let text = a.to_string();
            pool.holds(*a)
                && b.spec.held.contains(&text) == held
                && self.claim(name, &text).is_none()
        })
    }

    /// Whether another node's block holds addresses nobody claims (it can
    /// be asked to lend them).
    pub(super) fn has_lenders(&self, me: &str) -> bool {
        self.by_name
            .values()
            .any(|b| b.spec.node != me && spare(b) > 0)
    }

    /// Whether the whole pool was listed less than a second ago.
    pub(super) fn fresh(&self) -> bool {
        self.listed
            && self.complete
            && self
                .listed_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
    }

    /// The names of the blocks `node` owns.
    pub(super) fn owned_by(&self, node: &str) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, b)| b.spec.node == node)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Claims in every block (what the API server will hold after a flush).
    pub(super) fn claim_count(&self) -> usize {
        self.by_name.keys().map(|n| self.claims_in(n)).sum()
    }
}

/// Where an ask's address comes from.
pub(super) enum Target {
    /// Held by this node: handed out now, written by the next flush.
    Local(String, IpAddr),
    /// Not held by anyone: claimed by a compare-and-swap write now.
    Write(String, IpAddr),
    /// Nothing free that may be taken.
    None,
    /// Refused, with why (an exact address another node holds).
    Refused(String),
}

/// An ask's answer from one round.
pub(super) enum Answer {
    Address(IpAddr),
    /// Only held addresses of other nodes are free; they were asked to
    /// lend. Why the pool is full, if nothing comes.
    Wait(String),
}

pub(super) fn any_free(pool: &Pool, cidr: &IpNet) -> bool {
    let (lo, hi) = (pool::num(cidr.network()), pool::num(cidr.broadcast()));
    (lo..=hi).any(|n| pool.holds(pool::addr(pool.is_v6(), n)))
}

/// Where `node` begins its search of a pool's blocks: a stable hash of
/// its name (FNV-1a), so nodes spread over the pool instead of racing.
pub(super) fn spread(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Held addresses of block `b` that nobody claims (it can lend them).
pub(super) fn spare(b: &RailBlock) -> usize {
    b.spec
        .held
        .iter()
        .filter(|a| !b.spec.claims.contains_key(*a))
        .count()
}

/// `items` from the one `seed` picks, wrapping round.
pub(super) fn rotated<T>(items: &[T], seed: u64) -> impl Iterator<Item = &T> {
    let first = match items.len() {
        0 => 0,
        n => (seed % n as u64) as usize,
    };
    items[first..].iter().chain(&items[..first])
}

/// The starts of the aligned blocks of `size` over `ranges`, beginning
/// at the `first`-th (modulo their number) and wrapping round to those
/// before it; each once per range.
pub(super) fn block_starts(
    ranges: &[(u128, u128)],
    size: u128,
    first: u128,
) -> impl Iterator<Item = u128> {
    let spans: Vec<(u128, u128)> = ranges
        .iter()
        .map(|&(lo, hi)| {
            let start = lo - lo % size;
            (start, (hi - start) / size + 1)
        })
        .collect();
    let total = spans.iter().fold(0u128, |t, (_, n)| t.saturating_add(*n));
    let mut skip = if total == 0 { 0 } else { first % total };
    let (mut after, mut before) = (Vec::new(), Vec::new());
    for (start, n) in spans {
        if skip >= n {
            before.push((start, n));
            skip -= n;
        } else {
            if skip > 0 {
                before.push((start, skip));
            }
            after.push((start + skip * size, n - skip));
            skip = 0;
        }
    }
    after
        .into_iter()
        .chain(before)
        .flat_map(move |(start, n)| (0..n).map(move |i| start + i * size))
}

pub(super) fn block_cidr(pool: &Pool, start: u128, prefix: u8) -> IpNet {
    IpNet::new(pool::addr(pool.is_v6(), start), prefix).expect("prefix fits the family")
}
