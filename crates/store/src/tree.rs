//! The Merkle tree over the audit log, as the stores keep it: the hash of
//! every complete subtree in `merkle_nodes (level, idx, hash)`, written in
//! the transaction that commits its last event, and the tree's right edge
//! ([`Frontier`]) beside the chain head. Proofs and roots are read here,
//! the same way for every store, through [`Store::tree_nodes`]: one read
//! of at most [`TREE_READ_LEN_MAX`] nodes per proof.

use std::ops::Range;

use breakglass_core::audit::{AuditEvent, Hash, canonical_bytes};
use breakglass_core::merkle::{self, Frontier, Plan, Subtree};

use crate::{Store, StoreError};

/// The most nodes one [`Store::tree_nodes`] call may ask for: a root needs
/// at most 64, an inclusion or consistency proof at most 65 ranges of at
/// most 64 pieces each, most of them shared.
pub const TREE_READ_LEN_MAX: usize = 64 * 66;

/// The leaf input of an event: its canonical bytes.
pub fn leaf_of(e: &AuditEvent) -> Vec<u8> {
    canonical_bytes(
        e.seq,
        e.time,
        &e.actor,
        &e.action,
        e.request_id.as_deref(),
        &e.details,
    )
}

/// Appends committed events (in `seq` order, continuing the frontier) and
/// returns the nodes to store.
pub fn grow<'a>(
    frontier: &mut Frontier,
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Result<Vec<(Subtree, Hash)>, StoreError> {
    let mut out = Vec::new();
    for e in events {
        if e.seq != frontier.size() + 1 {
            return Err(StoreError::Corrupt(format!(
                "the Merkle tree holds {} events but the next event to add is seq {}",
                frontier.size(),
                e.seq
            )));
        }
        out.extend(frontier.push(&leaf_of(e)));
    }
    Ok(out)
}

async fn resolve(store: &dyn Store, ranges: &[Range<u64>]) -> Result<Vec<Hash>, StoreError> {
    let plan = Plan::new(ranges);
    let got = store.tree_nodes(plan.nodes()).await?;
    plan.hashes(&got)
        .ok_or_else(|| StoreError::Corrupt("a Merkle tree node is missing".into()))
}

/// The root of the tree of the first `size` events. A size beyond the
/// committed log has nodes missing: `Corrupt` naming the first. (Sizes
/// come from the log or from checkpoints, never from `Store::head`, which
/// may lag the log on a shared store.)
pub async fn tree_root(store: &dyn Store, size: u64) -> Result<Hash, StoreError> {
    if size == 0 {
        return Ok(merkle::empty_root());
    }
    let whole = 0..size;
    let mut r = resolve(store, std::slice::from_ref(&whole)).await?;
    r.pop()
        .ok_or_else(|| StoreError::Corrupt("a Merkle tree node is missing".into()))
}

/// The inclusion proof of event `seq` in the tree of the first `size`
/// events.
pub async fn inclusion_proof(
    store: &dyn Store,
    seq: u64,
    size: u64,
) -> Result<Vec<Hash>, StoreError> {
    let ranges = merkle::inclusion_ranges(seq.wrapping_sub(1), size)
        .map_err(|e| StoreError::Limit(e.to_string()))?;
    resolve(store, &ranges).await
}

/// The consistency proof from the tree of `old` events to that of `new`.
pub async fn consistency_proof(
    store: &dyn Store,
    old: u64,
    new: u64,
) -> Result<Vec<Hash>, StoreError> {
    let ranges =
        merkle::consistency_ranges(old, new).map_err(|e| StoreError::Limit(e.to_string()))?;
    resolve(store, &ranges).await
}

/// The embedded store's side: node inserts, reads, and the frontier at
/// open (building the tree of a log written before it existed).
pub mod sqlite {
    use breakglass_core::audit::{AuditEvent, Hash};
    use breakglass_core::merkle::{Frontier, Subtree, subtrees};
    use rusqlite::{Connection, OptionalExtension, params};

    use super::{TREE_READ_LEN_MAX, grow};
    use crate::StoreError;

    /// Events read per step while building the tree of an older log.
    const BACKFILL_PAGE_LEN: i64 = 10_000;

    pub fn insert(conn: &Connection, nodes: &[(Subtree, Hash)]) -> Result<(), StoreError> {
        let mut stmt =
            conn.prepare_cached("INSERT INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
        for (s, h) in nodes {
            stmt.execute(params![i64::from(s.level), s.index as i64, &h[..]])?;
        }
        Ok(())
    }

    pub fn read(conn: &Connection, nodes: &[Subtree]) -> Result<Vec<Hash>, StoreError> {
        if nodes.len() > TREE_READ_LEN_MAX {
            return Err(StoreError::Limit(format!(
                "at most {TREE_READ_LEN_MAX} tree nodes per read"
            )));
        }
        let mut stmt =
            conn.prepare_cached("SELECT hash FROM merkle_nodes WHERE level = ?1 AND idx = ?2")?;
        nodes
            .iter()
            .map(|s| {
                let blob: Option<Vec<u8>> = stmt
                    .query_row(params![i64::from(s.level), s.index as i64], |r| r.get(0))
                    .optional()?;
                let blob = blob.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "Merkle tree node (level {}, index {}) is missing",
                        s.level, s.index
                    ))
                })?;
                blob.try_into()
                    .map_err(|_| StoreError::Corrupt("a Merkle tree node is not 32 bytes".into()))
            })
            .collect()
    }

    /// The tree's right edge as stored, after adding every event the tree
    /// does not hold yet (a log written before the tree existed, on the
    /// first open after the upgrade). One transaction.
    pub fn open(conn: &mut Connection) -> Result<Frontier, StoreError> {
        let tx = conn.transaction()?;
        let mut size: u64 = tx
            .query_row(
                "SELECT idx FROM merkle_nodes WHERE level = 0 ORDER BY idx DESC LIMIT 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map_or(0, |i| i as u64 + 1);
        let head: u64 = tx
            .query_row("SELECT coalesce(max(seq), 0) FROM audit", [], |r| {
                r.get::<_, i64>(0)
            })?
            .max(0) as u64;
        if size > head {
            // The log lost events the tree holds: it was truncated (which
            // verification reports through the checkpoints and witnesses).
            // The tree follows the log, so writes go on where the log ends.
            tracing::warn!(
                tree = size,
                log = head,
                "the Merkle tree holds more events than the audit log: the log was truncated; the tree is cut back to the log"
            );
            tx.execute(
                "DELETE FROM merkle_nodes WHERE ((idx + 1) << level) > ?1",
                params![head as i64],
            )?;
            size = head;
        }
        let edge = read(&tx, &subtrees(0..size))?;
        let mut frontier = Frontier::from_parts(size, edge).map_err(StoreError::Corrupt)?;
        let mut added = 0u64;
        loop {
            let page: Vec<AuditEvent> = {
                let mut stmt = tx.prepare(
                    "SELECT seq, time, actor, action, request_id, details, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                let rows = stmt.query_map(
                    params![frontier.size() as i64, BACKFILL_PAGE_LEN],
                    crate::sqlite::row_to_event,
                )?;
                rows.collect::<Result<_, _>>()?
            };
            if page.is_empty() {
                break;
            }
            added += page.len() as u64;
            insert(&tx, &grow(&mut frontier, &page)?)?;
        }
        tx.commit()?;
        if added > 0 {
            tracing::info!(
                events = added,
                "Merkle tree built over the existing audit log"
            );
        }
        Ok(frontier)
    }
}

/// The shared store's side: the frontier lives in `chain_head.tree`, read
/// and written with the head under its row lock, so appending costs no
/// extra round trip; the nodes of a batch go in one `UNNEST` insert.
pub(crate) mod pg {
    use breakglass_core::audit::{AuditEvent, Hash};
    use breakglass_core::merkle::{Frontier, Subtree};
    use tokio_postgres::GenericClient;

    use super::{TREE_READ_LEN_MAX, grow};
    use crate::StoreError;
    use crate::postgres::{pg_err, row_to_event};

    /// Events read per step while building the tree of an older log.
    const BACKFILL_PAGE_LEN: i64 = 10_000;

    pub const INSERT: &str = "INSERT INTO merkle_nodes (level, idx, hash) \
         SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])";

    /// The columns of one node insert.
    pub fn columns(nodes: &[(Subtree, Hash)]) -> (Vec<i16>, Vec<i64>, Vec<Vec<u8>>) {
        (
            nodes.iter().map(|(s, _)| i16::from(s.level)).collect(),
            nodes.iter().map(|(s, _)| s.index as i64).collect(),
            nodes.iter().map(|(_, h)| h.to_vec()).collect(),
        )
    }

    pub fn frontier(bytes: &[u8]) -> Result<Frontier, StoreError> {
        Frontier::from_bytes(bytes)
            .map_err(|e| StoreError::Corrupt(format!("chain_head.tree: {e}")))
    }

    pub async fn read<C: GenericClient>(c: &C, nodes: &[Subtree]) -> Result<Vec<Hash>, StoreError> {
        if nodes.len() > TREE_READ_LEN_MAX {
            return Err(StoreError::Limit(format!(
                "at most {TREE_READ_LEN_MAX} tree nodes per read"
            )));
        }
        let levels: Vec<i16> = nodes.iter().map(|s| i16::from(s.level)).collect();
        let idxs: Vec<i64> = nodes.iter().map(|s| s.index as i64).collect();
        let rows = c
            .query(
                "SELECT n.level, n.idx, n.hash FROM merkle_nodes n \
                 JOIN UNNEST($1::smallint[], $2::bigint[]) AS w(level, idx) \
                 ON n.level = w.level AND n.idx = w.idx",
                &[&levels, &idxs],
            )
            .await
            .map_err(pg_err)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for r in rows {
            let key = Subtree {
                level: r.get::<_, i16>(0) as u8,
                index: r.get::<_, i64>(1) as u64,
            };
            let hash: Hash = r
                .get::<_, Vec<u8>>(2)
                .try_into()
                .map_err(|_| StoreError::Corrupt("a Merkle tree node is not 32 bytes".into()))?;
            found.insert(key, hash);
        }
        nodes
            .iter()
            .map(|s| {
                found.get(s).copied().ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "Merkle tree node (level {}, index {}) is missing",
                        s.level, s.index
                    ))
                })
            })
            .collect()
    }

    /// Adds every event up to `seq` that the tree does not hold yet: the
    /// events of a log written before the tree existed, or by a node of an
    /// older release. The caller holds the chain head lock.
    pub async fn catch_up<C: GenericClient>(
        c: &C,
        frontier: &mut Frontier,
        seq: u64,
    ) -> Result<u64, StoreError> {
        let mut added = 0;
        while frontier.size() < seq {
            let rows = c
                .query(
                    "SELECT seq, time, actor, action, request_id, details, hash FROM audit \
                     WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                    &[&(frontier.size() as i64), &(seq as i64), &BACKFILL_PAGE_LEN],
                )
                .await
                .map_err(pg_err)?;
            if rows.is_empty() {
                return Err(StoreError::Corrupt(format!(
                    "the chain head is at seq {seq} but the log ends at seq {}",
                    frontier.size()
                )));
            }
            let page: Vec<AuditEvent> = rows.iter().map(row_to_event).collect::<Result<_, _>>()?;
            added += page.len() as u64;
            let nodes = grow(frontier, &page)?;
            let (l, i, h) = columns(&nodes);
            c.execute(INSERT, &[&l, &i, &h]).await.map_err(pg_err)?;
        }
        Ok(added)
    }
}
