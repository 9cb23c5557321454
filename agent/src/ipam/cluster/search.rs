//! Finding an address for an ADD: from a block this node holds, else a
//! block nobody has claimed (claimed by creating it), else a free address
//! in another node's block (a write that loses a race is read back and
//! tried again), else by asking the nodes that hold free addresses to
//! lend them. ADDs arriving together are served together, one write per
//! block.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use ipnet::IpNet;
use kube::api::{ListParams, PostParams};

use super::*;

impl Inner {
    pub(super) async fn allocate(
        &self,
        pool: &Pool,
        key: &AllocationKey,
        wanted: Option<IpAddr>,
        owner: &Owner,
    ) -> Result<IpAddr, ClusterError> {
        if pool.disable {
            return Err(ClusterError::Full("the pool is disabled".into()));
        }
        if let Some(why) = wanted.and_then(|a| pool.refusal(a)) {
            return Err(ClusterError::Full(why));
        }
        let claim = Claim {
            container_id: key.container_id.clone(),
            interface: key.ifname.clone(),
            node: self.opts.node.clone(),
            network: owner.network.clone(),
            pod_namespace: owner.pod_namespace.clone(),
            pod_name: owner.pod_name.clone(),
            pod_uid: owner.pod_uid.clone(),
            netns_inode: owner.netns.inode,
            netns_cookie: owner.netns.cookie,
        };
        let deadline = Instant::now() + self.opts.lend_wait;
        // Waits for a lend grow (jittered) from one flush interval to 2 s:
        // borrowers that asked together do not all look again together.
        let mut waits = backon::ExponentialBuilder::new()
            .with_min_delay(self.opts.flush_interval)
            .with_max_delay(Duration::from_secs(2).max(self.opts.flush_interval))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            // Group commit: every ADD for this pool that arrives while a
            // write is in flight waits in `pending`; whoever takes the
            // pool's lock next serves them all, one write per block.
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.queue(
                &pool.name,
                Ask {
                    key: key.clone(),
                    wanted,
                    claim: claim.clone(),
                    reply,
                },
            );
            {
                let lock = self.blocks_of(&pool.name);
                let mut blocks = lock.lock().await;
                let batch = self.take_queued(&pool.name);
                if !batch.is_empty() {
                    self.serve(&mut blocks, pool, batch).await;
                }
            }
            let answer = answer.await.unwrap_or_else(|_| {
                Err(ClusterError::Unavailable("the request was dropped".into()))
            })?;
            match answer {
                Answer::Address(a) => return Ok(a),
                // The owners were asked to lend; their flush answers
                // within a lend check. The pool's lock is not held while
                // waiting: our own flush may be what another node waits
                // for.
                Answer::Wait(why) if Instant::now() >= deadline => {
                    return Err(ClusterError::Full(why));
                }
                Answer::Wait(_) => {
                    Self::count(&self.retries);
                    let wait = waits.next().unwrap_or(self.opts.flush_interval);
                    tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now())))
                        .await
                }
            }
        }
    }

    /// Queues `ask` for `pool`'s next write.
    pub(super) fn queue(&self, pool: &str, ask: Ask) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pool.to_owned())
            .or_default()
            .push(ask);
    }

    /// Takes every ask queued for `pool`.
    pub(super) fn take_queued(&self, pool: &str) -> Vec<Ask> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pool)
            .unwrap_or_default()
    }

    /// Serves a batch of asks for `pool`: each gets an address chosen
    /// against the blocks as cached (with the batch's earlier choices in
    /// them). A held address is answered at once; each block taken from
    /// is written once. A write that lost a race is read back: asks whose
    /// claim made it are answered, the rest go round again.
    pub(super) async fn serve(&self, blocks: &mut Blocks, pool: &Pool, batch: Vec<Ask>) {
        // Never read: this node's own blocks are enough to start handing
        // out (a free block is found by claiming it). In doubt after a
        // lost write: the whole pool, so a claim of ours is found.
        let read = match (blocks.listed, blocks.read) {
            (true, _) => Ok(()),
            (false, false) => self.relist_own(blocks, &pool.name).await,
            (false, true) => self.relist(blocks, &pool.name).await,
        };
        if let Err(e) = read {
            for ask in batch {
                ask.answer(Err(e.clone()));
            }
            return;
        }
        let mut open = batch;
        let mut relisted = false;
        for _ in 0..MAX_ROUNDS {
            if open.is_empty() {
                return;
            }
            let mut groups: BTreeMap<String, Vec<(Ask, IpAddr)>> = BTreeMap::new();
            let mut full = Vec::new();
            for ask in std::mem::take(&mut open) {
                if let Some((name, held)) = blocks.find(&ask.key) {
                    if let Some(w) = ask.wanted
                        && w != held
                    {
                        ask.answer(Err(ClusterError::Full(format!(
                            "this interface already holds {held}"
                        ))));
                    } else if let Some(g) = groups.get_mut(&name) {
                        // Asked twice in one batch: answered with the
                        // first's write.
                        g.push((ask, held));
                    } else {
                        ask.answer(Ok(Answer::Address(held)));
                    }
                    continue;
                }
                let target = match ask.wanted {
                    Some(a) => self.exact_target(blocks, pool, a).await,
                    None => self.next_target(blocks, pool, relisted).await,
                };
                match target {
                    Err(e) => {
                        ask.answer(Err(e));
                    }
                    Ok(Target::None) => full.push(ask),
                    Ok(Target::Refused(why)) => {
                        ask.answer(Err(ClusterError::Full(why)));
                    }
                    // Choosing may have fetched a block that already holds
                    // this ask's claim (a write whose answer was lost):
                    // that claim is the answer, not a second address.
                    Ok(_) if blocks.find(&ask.key).is_some() => open.push(ask),
                    Ok(Target::Local(name, address)) => {
                        blocks
                            .delta
                            .entry(name.clone())
                            .or_default()
                            .adds
                            .insert(address.to_string(), ask.claim.clone());
                        blocks.empty_since.remove(&name);
                        ask.answer(Ok(Answer::Address(address)));
                    }
                    Ok(Target::Write(name, address)) => {
                        // Held in the cache until the write says otherwise.
                        if let Some(b) = blocks.by_name.get_mut(&name) {
                            b.spec.claims.insert(address.to_string(), ask.claim.clone());
                        }
                        groups.entry(name).or_default().push((ask, address));
                    }
                }
            }
            for (name, members) in groups {
                let again = self.write_group(blocks, &name, members).await;
                self.retries
                    .fetch_add(again.len() as u64, std::sync::atomic::Ordering::Relaxed);
                open.extend(again);
            }
            if full.is_empty() {
                continue;
            }
            // The cache may be stale (another node released): look once
            // more before saying the pool is full.
            // At most one list a second: borrowers waiting for lenders
            // each listed the whole pool from etcd every 200 ms, and at a
            // launch on 100 nodes those lists were most of the API
            // server's work.
            // (Skipped only while there are lenders to wait for: a pool
            // that looks full is always read again before an ADD is told
            // so.)
            let waiting_is_enough = blocks.fresh() && blocks.has_lenders(&self.opts.node);
            if !relisted && !waiting_is_enough {
                relisted = true;
                if let Err(e) = self.relist(blocks, &pool.name).await {
                    for ask in full.into_iter().chain(open.drain(..)) {
                        ask.answer(Err(e.clone()));
                    }
                    return;
                }
                open.extend(full);
                continue;
            }
            let lenders = self.ask_to_lend(blocks, full.len()).await;
            blocks.tight = true;
            for ask in full {
                let why = match ask.wanted {
                    Some(a) => format!("{a} is held by another pod"),
                    None if lenders.is_empty() => format!(
                        "exhausted: all {} addresses are held ({} blocks)",
                        blocks.claim_count(),
                        blocks.by_name.len()
                    ),
                    None => format!(
                        "exhausted: every free address is held by node(s) {} for their pods, and they did not lend one within {:?} (is railnet-agent running there?)",
                        lenders.join(", "),
                        self.opts.lend_wait
                    ),
                };
                let answer = if ask.wanted.is_none() && !lenders.is_empty() {
                    Ok(Answer::Wait(why))
                } else {
                    Err(ClusterError::Full(why))
                };
                ask.answer(answer);
            }
        }
        for ask in open {
            ask.answer(Err(ClusterError::Unavailable(format!(
                "pool {}: {MAX_ROUNDS} rounds of conflicting writes",
                pool.name
            ))));
        }
    }

    /// Asks the owners of blocks with held addresses nobody claims to lend
    /// them (sets `lendRequested` where it is not set yet) — enough blocks
    /// for `need` addresses, from a place of this node's own: every
    /// borrower asking every block was a write per borrower per block, most
    /// of them refused as conflicts. Returns those owners; best effort: a
    /// failed ask is asked again next time.
    pub(super) async fn ask_to_lend(&self, blocks: &mut Blocks, need: usize) -> Vec<String> {
        let me = &self.opts.node;
        let candidates: Vec<String> = blocks
            .by_name
            .iter()
            .filter(|(_, b)| &b.spec.node != me && spare(b) > 0)
            .map(|(n, _)| n.clone())
            .collect();
        let mut names = Vec::new();
        let mut covered = 0;
        for name in rotated(&candidates, spread(me)) {
            if covered >= need {
                break;
            }
            covered += spare(&blocks.by_name[name]);
            names.push(name.clone());
        }
        let mut owners = BTreeSet::new();
        for name in names {
            let b = &blocks.by_name[&name];
            owners.insert(b.spec.node.clone());
            if b.spec.lend_requested {
                continue;
            }
            let mut next = b.clone();
            next.spec.lend_requested = true;
            match self.api.replace(&name, &PostParams::default(), &next).await {
                Ok(b) => {
                    self.count_write();
                    tracing::info!(block = %name, owner = %b.spec.node, "asked to lend held addresses");
                    blocks.by_name.insert(name, b);
                }
                Err(e) => {
                    self.count_conflict(status(&e));
                    tracing::debug!(block = %name, error = %e, "lend request not written");
                }
            }
        }
        owners.into_iter().collect()
    }

    /// Writes block `name` as cached (the group's claims in it) if it is
    /// still as we saw it; answers the asks whose claims are stored and
    /// returns the others, to go round again.
    pub(super) async fn write_group(
        &self,
        blocks: &mut Blocks,
        name: &str,
        members: Vec<(Ask, IpAddr)>,
    ) -> Vec<Ask> {
        let Some(next) = blocks.by_name.get(name).cloned() else {
            return members.into_iter().map(|(a, _)| a).collect();
        };
        let e = match self.api.replace(name, &PostParams::default(), &next).await {
            Ok(b) => {
                self.count_write();
                blocks.by_name.insert(name.to_owned(), b);
                for (ask, address) in members {
                    ask.answer(Ok(Answer::Address(address)));
                }
                return Vec::new();
            }
            Err(e) => e,
        };
        // Whatever happened, the cached copy (with our tentative claims)
        // is no longer the truth.
        blocks.by_name.remove(name);
        match self.read_back(name, e).await {
            Ok(Some(b)) => {
                let mut again = Vec::new();
                for (ask, address) in members {
                    let ours = b.spec.claims.get(&address.to_string()).is_some_and(|c| {
                        c.container_id == ask.claim.container_id
                            && c.interface == ask.claim.interface
                    });
                    if ours {
                        ask.answer(Ok(Answer::Address(address)));
                    } else {
                        again.push(ask);
                    }
                }
                blocks.by_name.insert(name.to_owned(), b);
                again
            }
            Ok(None) => members.into_iter().map(|(a, _)| a).collect(),
            Err((err, unknown)) => {
                if unknown {
                    // Neither the write's answer nor the block could be
                    // read: a claim of ours may be stored. Read every
                    // block of the pool before the next choice, so a
                    // retried ADD finds it rather than taking a second
                    // address.
                    blocks.listed = false;
                }
                for (ask, _) in members {
                    ask.answer(Err(err.clone()));
                }
                Vec::new()
            }
        }
    }

    /// After write error `e` on block `name`: the block as it is now, when
    /// that decides what became of the write (someone else wrote or
    /// deleted it, or no answer came); else the error to report, and
    /// whether the write may have happened.
    pub(super) async fn read_back(
        &self,
        name: &str,
        e: kube::Error,
    ) -> Result<Option<RailBlock>, (ClusterError, bool)> {
        let code = status(&e);
        self.count_conflict(code);
        if !read_back_decides(code) {
            return Err((classify(e), false));
        }
        match self.get(name).await {
            Ok(b) => Ok(b),
            Err(e2) if code.is_none() => Err((classify(e).or(e2), true)),
            Err(e2) => Err((e2, true)),
        }
    }

    pub(super) async fn release(&self, released: &[Allocation]) -> Result<(), ClusterError> {
        for a in released {
            let lock = self.blocks_of(&a.pool);
            let mut blocks = lock.lock().await;
            self.remove_claim(&mut blocks, a).await?;
        }
        Ok(())
    }

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
