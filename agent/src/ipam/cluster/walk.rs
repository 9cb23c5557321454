//! The block walk: where the next address for a pool may be — the blocks
//! as listed (relisted when the cache is stale), the next block to try in
//! the node's own order, the block a requested address falls in — and
//! claiming a block nobody has by creating it.

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use ipnet::IpNet;
use kube::api::{ListParams, PostParams};

use super::*;

impl Inner {
    /// Reads every block of `pool` into the cache (this node's unwritten
    /// changes stay).
    pub(super) async fn relist(&self, blocks: &mut Blocks, pool: &str) -> Result<(), ClusterError> {
        let lp = ListParams::default().labels(&format!("{POOL_LABEL}={pool}"));
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        blocks.by_name = list
            .items
            .into_iter()
            .filter(|b| b.spec.pool == pool)
            .map(|b| (b.metadata.name.clone().unwrap_or_default(), b))
            .collect();
        blocks.listed = true;
        blocks.complete = true;
        blocks.read = true;
        blocks.listed_at = Some(Instant::now());
        Ok(())
    }

    /// Reads this node's own blocks of `pool` (a first read: nothing of
    /// the pool is cached yet).
    pub(super) async fn relist_own(
        &self,
        blocks: &mut Blocks,
        pool: &str,
    ) -> Result<(), ClusterError> {
        // From the API server's cache (`resourceVersion=0`), not a read
        // of every block of the pool from etcd: a block of ours the cache
        // has not seen yet is met again when claimed (409), and nothing
        // is handed out of a block not read.
        let lp = ListParams::default()
            .labels(&format!(
                "{POOL_LABEL}={pool},{NODE_LABEL}={}",
                self.opts.node
            ))
            .match_any();
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        blocks.by_name.extend(
            list.items
                .into_iter()
                .filter(|b| b.spec.pool == pool && b.spec.node == self.opts.node)
                .map(|b| (b.metadata.name.clone().unwrap_or_default(), b)),
        );
        blocks.listed = true;
        blocks.read = true;
        Ok(())
    }

    pub(super) fn prefix(&self, pool: &Pool) -> u8 {
        let want = if pool.is_v6() {
            self.opts.block_prefix_v6
        } else {
            self.opts.block_prefix_v4
        };
        // A pool smaller than a block is one block.
        want.max(pool.subnet.prefix_len())
    }

    /// Where the next address comes from: a held address of ours, else a
    /// block nobody has claimed (claimed now, held whole), else a free
    /// address nobody holds in any block. `listed_now`: the whole pool
    /// was listed for this batch (as fresh as a list can be: blocks met
    /// after it were claimed since, and the walk goes on past them).
    pub(super) async fn next_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
        listed_now: bool,
    ) -> Result<Target, ClusterError> {
        let me = &self.opts.node;
        for name in blocks.owned_by(me) {
            if let Some(a) = blocks.free(pool, &name, true) {
                return Ok(Target::Local(name, a));
            }
        }
        let prefix = self.prefix(pool);
        // Walk aligned blocks over the pool's ranges. Nodes that all
        // walked from the first block raced for each block in turn (at a
        // job launch on 50 nodes, four refused block claims for every
        // block made). A /64 is never enumerated: every step either skips
        // a known block or stops.
        let size: u128 = 1u128 << (if pool.is_v6() { 128 } else { 32 } - u32::from(prefix));
        let start = u128::from(spread(me));
        let mut met = 0;
        // In order while nobody else is met (a quiet pool fills from its
        // start: addresses a person can predict); from the node's own
        // place once another node's block is met (at a launch every node
        // meets one block taken, not every block before its own).
        'phases: for first in [0, start] {
            for start in block_starts(pool.ranges(), size, first) {
                let cidr = block_cidr(pool, start, prefix);
                let name = block_name(&pool.name, &cidr);
                if blocks.by_name.contains_key(&name) || !any_free(pool, &cidr) {
                    continue;
                }
                let b = self.claim_block(pool, &name, &cidr).await?;
                let mine = &b.spec.node == me;
                blocks.by_name.insert(name.clone(), b);
                if mine && let Some(a) = blocks.free(pool, &name, true) {
                    return Ok(Target::Local(name, a));
                }
                if mine {
                    continue;
                }
                // Another node's: with only our own blocks read (or a list
                // of the pool from before the launch), a pool filling up
                // would be probed block by block, a refused create and a
                // read each. One list of the pool instead (after this
                // batch's writes).
                // Not after a list made for this batch, though: on a busy
                // API server the walk outlives a second, and saying "none"
                // then sent an ADD of a pool with thousands of free blocks
                // to wait for lenders (at a launch on 500 nodes against
                // kube-apiserver, one pod was told its /16 was exhausted).
                met += 1;
                if met >= 2 && !listed_now && !blocks.fresh() {
                    return Ok(Target::None);
                }
                if first == 0 {
                    continue 'phases;
                }
            }
            // The first phase walked every block without meeting another
            // node's: nothing left to claim.
            break;
        }
        if !blocks.complete {
            return Ok(Target::None);
        }
        // Another node's block with a free address that nobody holds:
        // also from a place of this node's own, or every borrower would
        // write into the same block and all but one be refused.
        let names: Vec<String> = blocks.by_name.keys().cloned().collect();
        for name in rotated(&names, spread(me)) {
            if let Some(a) = blocks.free(pool, name, false) {
                return Ok(Target::Write(name.clone(), a));
            }
        }
        Ok(Target::None)
    }

    /// The block holding `address` (claimed now if nobody has), if the
    /// address is free in it.
    pub(super) async fn exact_target(
        &self,
        blocks: &mut Blocks,
        pool: &Pool,
        address: IpAddr,
    ) -> Result<Target, ClusterError> {
        let prefix = self.prefix(pool);
        let cidr = IpNet::new(address, prefix)
            .expect("prefix fits the family")
            .trunc();
        let name = block_name(&pool.name, &cidr);
        if !blocks.by_name.contains_key(&name) {
            let b = self.claim_block(pool, &name, &cidr).await?;
            blocks.by_name.insert(name.clone(), b);
        }
        let text = address.to_string();
        if blocks.claim(&name, &text).is_some() {
            return Ok(Target::None);
        }
        let b = &blocks.by_name[&name];
        let busy = blocks.busy.contains(&name);
        Ok(
            match (b.spec.held.contains(&text), b.spec.node == self.opts.node) {
                // Ours, but its held set is being written: a claim written now
                // is safe either way (the writes are ordered by the block's
                // resourceVersion).
                (true, true) if busy => Target::Write(name, address),
                (false, _) => Target::Write(name, address),
                (true, true) => Target::Local(name, address),
                (true, false) => Target::Refused(format!(
                    "{address} is held by node {} (its block {name}) for its pods",
                    b.spec.node
                )),
            },
        )
    }

    /// Creates the block for this node, every address of it held; if it
    /// exists already, whoever owns it, returns it as it is (a retried
    /// create meeting our own block is ours).
    pub(super) async fn claim_block(
        &self,
        pool: &Pool,
        name: &str,
        cidr: &IpNet,
    ) -> Result<RailBlock, ClusterError> {
        let (lo, hi) = (pool::num(cidr.network()), pool::num(cidr.broadcast()));
        let held = (lo..=hi)
            .map(|n| pool::addr(pool.is_v6(), n))
            .filter(|a| pool.holds(*a))
            .map(|a| a.to_string())
            .collect();
        let block = RailBlock {
            api_version: "railnet.io/v1alpha1".into(),
            kind: "RailBlock".into(),
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([
                    (POOL_LABEL.to_owned(), pool.name.clone()),
                    (NODE_LABEL.to_owned(), self.opts.node.clone()),
                ])),
                ..ObjectMeta::default()
            },
            spec: BlockSpec {
                pool: pool.name.clone(),
                cidr: cidr.to_string(),
                node: self.opts.node.clone(),
                claims: BTreeMap::new(),
                held,
                lend_requested: false,
            },
        };
        // A block found taken can be deleted by its owner (emptied) before
        // we read it: then it is free again, and we try to claim it anew.
        for _ in 0..MAX_ROUNDS {
            match self.api.create(&PostParams::default(), &block).await {
                Ok(b) => {
                    self.count_write();
                    tracing::info!(block = name, pool = %pool.name, %cidr, "claimed an address block");
                    return Ok(b);
                }
                Err(e) if status(&e) == Some(409) => {
                    self.count_conflict(Some(409));
                    if let Some(b) = self.get(name).await? {
                        return Ok(b);
                    }
                }
                Err(e) => return Err(classify(e)),
            }
        }
        Err(ClusterError::Unavailable(format!(
            "block {name}: claimed and released {MAX_ROUNDS} times while we looked"
        )))
    }
}
