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
use kube::api::PostParams;

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
        // A request that never left (no connection) wrote nothing: the
        // block is as we know it, and reading it back would fail the same
        // way, leaving the pool in doubt for nothing.
        if !read_back_decides(code) || never_sent(&e) {
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
}
