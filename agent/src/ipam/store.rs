//! Where allocations live: the seam, an in-memory store for unit tests, and
//! the embedded default — redb on local disk with group commit.

use std::{
    path::Path,
    sync::{
        Mutex,
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Allocation, AllocationKey};

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused.
    #[error("{0}")]
    Db(String),
    /// A record that does not decode (written by something else?).
    #[error("record {key:?} is corrupt: {why}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// The writer thread is gone.
    #[error("the store's writer stopped")]
    Stopped,
}

/// A durable home for allocations. `put` and `delete` return only once the
/// change survives a crash (or failed and changed nothing).
pub trait AllocationStore: Send + Sync {
    /// Every allocation recorded.
    fn load(&self) -> Result<Vec<Allocation>, StoreError>;
    /// Records one allocation.
    fn put(&self, allocation: &Allocation) -> Result<(), StoreError>;
    /// Forgets allocations.
    fn delete(&self, released: &[Allocation]) -> Result<(), StoreError>;
}

/// Allocations in memory only: for unit tests and the benchmark's pure
/// allocator figures.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<Vec<Allocation>>,
}

impl MemoryStore {
    /// A store that starts out holding `records` (what another store
    /// loaded).
    pub fn holding(records: Vec<Allocation>) -> Self {
        Self {
            records: Mutex::new(records),
        }
    }
}

impl AllocationStore for MemoryStore {
    fn load(&self) -> Result<Vec<Allocation>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
    fn put(&self, _: &Allocation) -> Result<(), StoreError> {
        Ok(())
    }
    fn delete(&self, _: &[Allocation]) -> Result<(), StoreError> {
        Ok(())
    }
}

const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");

fn key_of(k: &AllocationKey) -> String {
    format!("{}/{}/{:?}", k.container_id, k.ifname, k.family)
}

enum Change {
    Put(String, Vec<u8>),
    Delete(Vec<String>),
}

struct Pending {
    change: Change,
    done: Sender<Result<(), String>>,
}

/// redb's page cache for the allocation store (see [`RedbStore::open`]).
const CACHE_BYTES: usize = 4 << 20;

/// redb on local disk. One writer thread takes every change queued while
/// the previous commit was syncing and commits them together: with 50
/// concurrent ADDs, one fsync serves dozens of them.
pub struct RedbStore {
    db: std::sync::Arc<Database>,
    queue: Mutex<Option<Sender<Pending>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        }
        // redb caches up to 1 GiB by default, and keeps every page it has
        // touched: a node's whole store (tens of MB at 65 000 allocations)
        // would stay resident for the agent's life. Its interior pages and
        // one group commit's dirty pages fit in far less.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        // The table exists from the first start on, so reads never race it.
        let txn = db
            .begin_write()
            .map_err(|e| StoreError::Db(e.to_string()))?;
        txn.open_table(ALLOCATIONS)
            .map_err(|e| StoreError::Db(e.to_string()))?;
        txn.commit().map_err(|e| StoreError::Db(e.to_string()))?;
        let db = std::sync::Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("railnet-ipam-writer".into())
            .spawn(move || write_loop(&writer_db, &rx))
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(Self {
            db,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    fn submit(&self, change: Change) -> Result<(), StoreError> {
        let (done, wait) = mpsc::channel();
        {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue
                .as_ref()
                .ok_or(StoreError::Stopped)?
                .send(Pending { change, done })
                .map_err(|_| StoreError::Stopped)?;
        }
        wait.recv()
            .map_err(|_| StoreError::Stopped)?
            .map_err(StoreError::Db)
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Err: the writer panicked; its waiters were told (their
            // channels closed) and there is nothing left to stop.
            let _ = w.join();
        }
    }
}

fn write_loop(db: &Database, rx: &Receiver<Pending>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = commit(db, &batch).map_err(|e| e.to_string());
        for p in batch {
            // Err: the caller stopped waiting; the change is committed
            // (or not) all the same, as `result` says.
            let _ = p.done.send(result.clone());
        }
    }
}

fn commit(db: &Database, batch: &[Pending]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(ALLOCATIONS)?;
        for p in batch {
            match &p.change {
                Change::Put(k, v) => {
                    table.insert(k.as_str(), v.as_slice())?;
                }
                Change::Delete(keys) => {
                    for k in keys {
                        table.remove(k.as_str())?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

impl AllocationStore for RedbStore {
    fn load(&self) -> Result<Vec<Allocation>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let table = txn
            .open_table(ALLOCATIONS)
            .map_err(|e| StoreError::Db(e.to_string()))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| StoreError::Db(e.to_string()))? {
            let (k, v) = row.map_err(|e| StoreError::Db(e.to_string()))?;
            let a: Allocation =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    key: k.value().to_owned(),
                    why: e.to_string(),
                })?;
            out.push(a);
        }
        Ok(out)
    }

    fn put(&self, allocation: &Allocation) -> Result<(), StoreError> {
        let value = serde_json::to_vec(allocation).map_err(|e| StoreError::Db(e.to_string()))?;
        self.submit(Change::Put(key_of(&allocation.key), value))
    }

    fn delete(&self, released: &[Allocation]) -> Result<(), StoreError> {
        self.submit(Change::Delete(
            released.iter().map(|a| key_of(&a.key)).collect(),
        ))
    }
}
