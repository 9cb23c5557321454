//! A node's own blocks: writing the claims it made from held addresses
//! (one write per block per flush), giving up held addresses when another
//! node asks it to lend, deleting blocks left empty, and the one watch on
//! its blocks through which those asks arrive.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use kube::api::{ListParams, PostParams};

use super::{
    Blocks, ClusterError, Inner, MAX_ROUNDS, NODE_LABEL, RailBlock, classify, if_unchanged,
};

impl Inner {
    /// Flushes every `flush_interval` until the store is dropped.
    pub(super) async fn flush_loop(inner: std::sync::Weak<Inner>) {
        loop {
            let interval = match inner.upgrade() {
                Some(i) => i.opts.flush_interval,
                None => return,
            };
            tokio::time::sleep(interval).await;
            let Some(i) = inner.upgrade() else { return };
            if let Err(e) = i.flush(false).await {
                tracing::warn!(error = %e, "claims not written yet; retrying");
            }
        }
    }

    /// Watches this node's blocks for lend requests (one long-poll watch,
    /// not a list per node per second): each is answered by the next
    /// flush. A watch that ends or fails is resumed after a fresh list.
    pub(super) async fn lend_watch(inner: std::sync::Weak<Inner>) {
        use futures::StreamExt;
        use kube::api::{WatchEvent, WatchParams};
        // Failed starts, and watches the API server ended at once, are
        // retried after a growing, jittered pause: at a job launch on 100
        // nodes, an API server too busy to answer a list in time met every
        // node's retry each second, all together, and answered none (ten
        // thousand lists given up in seven minutes).
        let pauses = || {
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut pause = pauses();
        // Where the last watch got to: a watch that ended (the server's
        // timeout, or a busy server closing a slow watcher) resumes from
        // there without a list; one refused as too old lists again.
        let mut resume: Option<String> = None;
        loop {
            let Some(i) = inner.upgrade() else { return };
            let started = async {
                // A list (to answer requests made while no watch ran),
                // then a watch from its version.
                let version = match resume.take() {
                    Some(v) => v,
                    None => i
                        .check_lend_requests()
                        .await
                        .map_err(|e| format!("cannot look for lend requests: {e}"))?,
                };
                let wp = WatchParams::default()
                    .labels(&format!("{NODE_LABEL}={}", i.opts.node))
                    .timeout(290);
                let wp = WatchParams {
                    bookmarks: true,
                    ..wp
                };
                Self::count(&i.watches);
                let stream = i
                    .watch_api
                    .watch(&wp, &version)
                    .await
                    .map_err(|e| format!("cannot watch this node's blocks: {e}"))?;
                Ok::<_, String>((stream, version))
            }
            .await;
            drop(i);
            let (stream, mut version) = match started {
                Ok(s) => s,
                Err(e) => {
                    let wait = pause.next().unwrap_or(Duration::from_secs(30));
                    tracing::debug!(error = %e, ?wait, "the lend watch did not start; trying again");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            let opened = tokio::time::Instant::now();
            let mut relist = false;
            while let Some(event) = stream.next().await {
                let Some(i) = inner.upgrade() else { return };
                Self::count(&i.watch_events);
                match event {
                    Ok(WatchEvent::Added(b) | WatchEvent::Modified(b)) => {
                        version = b.metadata.resource_version.clone().unwrap_or(version);
                        i.note_lend(b);
                    }
                    Ok(WatchEvent::Deleted(b)) => {
                        version = b.metadata.resource_version.unwrap_or(version);
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(e)) => {
                        tracing::debug!(error = %e, "the lend watch was refused; again from a fresh list");
                        relist = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the lend watch failed; again from a fresh list");
                        relist = true;
                        break;
                    }
                }
            }
            if !relist {
                resume = Some(version);
            }
            if opened.elapsed() < Duration::from_secs(5) {
                let wait = pause.next().unwrap_or(Duration::from_secs(30));
                tracing::debug!(lasted = ?opened.elapsed(), ?wait, "the lend watch ended early");
                tokio::time::sleep(wait).await;
            } else {
                pause = pauses();
            }
        }
    }

    /// Notes the lend requests on this node's blocks (one list of them);
    /// returns the list's resourceVersion, to watch from.
    pub(super) async fn check_lend_requests(&self) -> Result<String, ClusterError> {
        // From the cache: the watch follows from its version, so nothing
        // written after it is missed.
        let lp = ListParams::default()
            .labels(&format!("{NODE_LABEL}={}", self.opts.node))
            .match_any();
        Self::count(&self.lists);
        let list = self.api.list(&lp).await.map_err(classify)?;
        for b in list.items {
            self.note_lend(b);
        }
        Ok(list.metadata.resource_version.unwrap_or_default())
    }

    /// If block `b` (ours) asks us to lend, the next flush answers.
    ///
    /// Noted without waiting for the pool's lock (held across API writes):
    /// the API server closes a watch whose reader stalls once its buffer
    /// fills (at a job launch on 100 nodes watches were seen closing
    /// within 100 ms; this alone did not stop that — see `lend_watch`).
    pub(super) fn note_lend(&self, b: RailBlock) {
        if !b.spec.lend_requested || b.spec.node != self.opts.node {
            return;
        }
        self.lend_asks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(b);
    }

    /// Hands the lend requests noted since the last flush to their pools.
    pub(super) async fn take_lend_asks(&self) {
        let asks = std::mem::take(&mut *self.lend_asks.lock().unwrap_or_else(|p| p.into_inner()));
        for b in asks {
            let name = b.metadata.name.clone().unwrap_or_default();
            let lock = self.blocks_of(&b.spec.pool);
            let mut blocks = lock.lock().await;
            blocks.lend.insert(name.clone());
            // The event may be older than our copy (our own answer to
            // this request can come first): a stale copy would hand out
            // addresses already lent. The write answering the request
            // reads the block if our copy is behind.
            blocks.by_name.entry(name).or_insert(b);
        }
    }

    /// Writes each own block that has unwritten claims or releases, a lend
    /// request to answer, or has been empty for the grace (`now`: every
    /// block with changes, lend requests answered, empty blocks kept). The
    /// pool's lock is not held while a write is in flight: ADDs go on
    /// being served from held addresses, also while the API server is
    /// away.
    pub(super) async fn flush(&self, now: bool) -> Result<(), ClusterError> {
        self.take_lend_asks().await;
        let mut first = None;
        for (_, lock) in self.pool_locks() {
            let due = {
                let mut blocks = lock.lock().await;
                let mut due = Vec::new();
                for name in blocks.owned_by(&self.opts.node) {
                    if blocks.claims_in(&name) == 0 {
                        blocks
                            .empty_since
                            .entry(name.clone())
                            .or_insert_with(Instant::now);
                    } else {
                        blocks.empty_since.remove(&name);
                    }
                    let changed = blocks.delta.get(&name).is_some_and(|d| !d.is_empty());
                    let expired = !now
                        && blocks
                            .empty_since
                            .get(&name)
                            .is_some_and(|t| t.elapsed() >= self.opts.empty_block_grace);
                    if changed || blocks.lend.contains(&name) || expired {
                        due.push(name);
                    }
                }
                due
            };
            for name in due {
                if let Err(e) = self.write_own(&lock, &name, now).await {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes own block `name` with its unwritten changes; gives up the
    /// held addresses nobody uses if asked to lend; deletes it if it has
    /// been empty for the grace (or is empty and asked to lend).
    pub(super) async fn write_own(
        &self,
        lock: &tokio::sync::Mutex<Blocks>,
        name: &str,
        keep_empty: bool,
    ) -> Result<(), ClusterError> {
        for _ in 0..MAX_ROUNDS {
            let (current, next, written, lend, delete) = {
                let mut blocks = lock.lock().await;
                let Some(current) = blocks.by_name.get(name).cloned() else {
                    return self.lost_block(&mut blocks, name);
                };
                let mut written = blocks.delta.get(name).cloned().unwrap_or_default();
                let mut next = current.clone();
                for address in written.apply(&mut next.spec) {
                    // Never overwrite: the stored claim is the one other
                    // nodes see. Ours is dropped from the write, loudly.
                    let ours = written.adds.remove(&address).unwrap_or_default();
                    let theirs = &current.spec.claims[&address];
                    tracing::error!(
                        block = name,
                        %address,
                        pod = %format!("{}/{}", ours.pod_namespace, ours.pod_name),
                        container = %ours.container_id,
                        claimed_by = %format!("{}/{} on node {}", theirs.pod_namespace, theirs.pod_name, theirs.node),
                        "this node handed out an address another pod already claims; not overwriting that claim — both pods have the address: delete one of them"
                    );
                    if let Some(d) = blocks.delta.get_mut(name) {
                        d.adds.remove(&address);
                    }
                }
                let lend = blocks.lend.contains(name) || current.spec.lend_requested;
                if lend {
                    let claims = &next.spec.claims;
                    next.spec.held.retain(|a| claims.contains_key(a));
                    next.spec.lend_requested = false;
                }
                let expired = blocks
                    .empty_since
                    .get(name)
                    .is_some_and(|t| t.elapsed() >= self.opts.empty_block_grace);
                let delete = next.spec.claims.is_empty() && (lend || (expired && !keep_empty));
                if lend || delete {
                    blocks.busy.insert(name.to_owned());
                }
                (current, next, written, lend, delete)
            };
            let result = if delete {
                // Give the range back: deleted only if nobody wrote since.
                self.api
                    .delete(name, &if_unchanged(&current.metadata))
                    .await
                    .map(|_| None)
            } else {
                self.api
                    .replace(name, &PostParams::default(), &next)
                    .await
                    .map(Some)
            };
            let back = match result {
                Ok(written) => Ok(written),
                Err(e) => Err(self.read_back(name, e).await),
            };
            let mut blocks = lock.lock().await;
            blocks.busy.remove(name);
            match back {
                Ok(stored) => {
                    self.count_write();
                    tracing::debug!(block = name, adds = ?written.adds.keys().collect::<Vec<_>>(), removes = ?written.removes, "flushed");
                    if let Some(d) = blocks.delta.get_mut(name) {
                        d.subtract(&written);
                        if d.is_empty() {
                            blocks.delta.remove(name);
                        }
                    }
                    if lend {
                        blocks.lend.remove(name);
                        blocks.tight = true;
                    }
                    match stored {
                        Some(b) => {
                            if lend {
                                tracing::info!(
                                    block = name,
                                    held = b.spec.held.len(),
                                    "lent the held addresses not in use"
                                );
                            }
                            blocks.by_name.insert(name.to_owned(), b);
                        }
                        None => {
                            tracing::info!(block = name, "gave an empty address block back");
                            blocks.by_name.remove(name);
                            blocks.empty_since.remove(name);
                            blocks.lend.remove(name);
                        }
                    }
                    return Ok(());
                }
                Err(Ok(Some(b))) => {
                    blocks.by_name.insert(name.to_owned(), b);
                }
                Err(Ok(None)) if delete => {
                    blocks.by_name.remove(name);
                    blocks.empty_since.remove(name);
                    blocks.lend.remove(name);
                    return Ok(());
                }
                Err(Ok(None)) => {
                    blocks.by_name.remove(name);
                    return self.lost_block(&mut blocks, name);
                }
                Err(Err((e, undecided))) => {
                    if undecided {
                        // The write may have happened (a lend gave held
                        // addresses away) and the block could not be read:
                        // our copy is not the truth. Nothing is handed out
                        // of this pool until it is read again.
                        blocks.listed = false;
                        tracing::warn!(block = name, error = %e, "a write's answer was lost; reading the pool again before handing out its addresses");
                    }
                    return Err(e);
                }
            }
        }
        Err(ClusterError::Unavailable(format!(
            "block {name}: {MAX_ROUNDS} rounds of conflicting writes"
        )))
    }

    /// Our block is gone (someone deleted it by hand): its unwritten claims
    /// have nowhere to go. Said loudly; the pods keep their addresses
    /// until released, and the range may be claimed again.
    pub(super) fn lost_block(&self, blocks: &mut Blocks, name: &str) -> Result<(), ClusterError> {
        blocks.empty_since.remove(name);
        blocks.lend.remove(name);
        if let Some(d) = blocks.delta.remove(name)
            && !d.adds.is_empty()
        {
            tracing::error!(
                block = name,
                claims = d.adds.len(),
                "this node's address block was deleted from the API server with claims not yet written; those addresses may be handed out again — do not delete RailBlocks by hand"
            );
        }
        Ok(())
    }
}
