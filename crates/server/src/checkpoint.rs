//! Signed checkpoints of the audit chain: the writer of the log cannot
//! rewrite or truncate history without the signing key, and every
//! checkpoint is also handed to the witnesses outside the data dir (by
//! default a file in `<data_dir>.witness/`), so that deleting the last
//! events together with their checkpoints is detected too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use breakglass_core::audit::{ChainVerifier, Checkpoint};
use breakglass_store::{Store, StoreError, for_each_event};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::app::{App, now};

/// A place outside the data dir that keeps a copy of every checkpoint.
/// Later sinks (notifications, syslog) are witnesses too.
pub trait Witness: Send + Sync {
    /// Names the witness in messages (`file /path/checkpoints.jsonl`).
    fn name(&self) -> String;
    /// Keeps `cp`; called before the store holds it, so a witness is never
    /// behind the store unless this failed (which is logged).
    fn record(&self, cp: &Checkpoint) -> Result<(), String>;
    /// What the witness holds, for verification: `Ok(None)` when it holds
    /// nothing at all (missing or empty).
    fn read(&self) -> Result<Option<Vec<Checkpoint>>, String>;
    /// Whether [`Witness::read`] can tell what the witness holds. A witness
    /// that only receives (a webhook) cannot be read back, so verification
    /// skips it; its receiver keeps the checkpoints.
    fn readable(&self) -> bool {
        true
    }
}

/// A checkpoint file: one JSON line per checkpoint, fsynced.
pub struct FileWitness {
    pub path: PathBuf,
}

impl Witness for FileWitness {
    fn name(&self) -> String {
        format!("checkpoint file {}", self.path.display())
    }

    fn record(&self, cp: &Checkpoint) -> Result<(), String> {
        append_line(&self.path, cp).map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn read(&self) -> Result<Option<Vec<Checkpoint>>, String> {
        if !self.path.exists() {
            return Ok(None);
        }
        let cps = read_checkpoint_file(&self.path)?;
        Ok((!cps.is_empty()).then_some(cps))
    }
}

/// The witnesses the config names.
pub fn witnesses(config: &crate::config::Config) -> Vec<Box<dyn Witness>> {
    let mut out: Vec<Box<dyn Witness>> = Vec::new();
    if let Some(path) = config.witness_file() {
        out.push(Box::new(FileWitness { path }));
    }
    out.extend(crate::notify::webhook_witnesses(config));
    out
}

/// Signs the current head and the Merkle tree head of the same size if it
/// moved since `last_seq`; returns the new checkpointed seq. The witnesses get the checkpoint first, then the store.
pub async fn checkpoint_once(
    store: &dyn Store,
    key: &SigningKey,
    witnesses: &[Box<dyn Witness>],
    last_seq: u64,
) -> Result<u64, StoreError> {
    let (seq, hash) = store.head();
    if seq == 0 || seq == last_seq {
        return Ok(last_seq);
    }
    // The tree head of the same `seq`: its nodes committed with its events.
    let root = breakglass_store::tree::tree_root(store, seq).await?;
    let cp = Checkpoint::sign_tree(key, seq, hash, root, now());
    for w in witnesses {
        if let Err(e) = w.record(&cp) {
            // Verification will report the witness as behind the store.
            tracing::error!(witness = %w.name(), error = %e, "cannot hand a checkpoint to its witness; `audit verify` will fail until it holds the newest checkpoint again");
        }
    }
    store.add_checkpoint(cp.clone()).await?;
    Ok(seq)
}

/// A torn last line (a crash while appending) is cut off before the next
/// append, so it never glues onto a whole one; looked for this far back.
const TORN_TAIL_LEN_MAX: u64 = 64 * 1024;

fn append_line(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).read(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    cut_torn_tail(&mut f)?;
    let line = serde_json::to_string(cp).map_err(std::io::Error::other)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

fn cut_torn_tail(f: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let from = len.saturating_sub(TORN_TAIL_LEN_MAX);
    f.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    f.take(len - from).read_to_end(&mut tail)?;
    if tail.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = tail
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(from, |i| from + i as u64 + 1);
    f.set_len(keep)
}

/// Creates the directory of a witness file (owner-only) when it does not
/// exist yet; returns whether it was created now.
pub fn prepare_witness_dir(file: &Path) -> std::io::Result<bool> {
    let Some(dir) = file.parent() else {
        return Ok(false);
    };
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(false);
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)?;
    Ok(true)
}

/// Checks each witness against the store's checkpoints signed by `node`
/// (the key id of the node the witnesses belong to: with several nodes,
/// each node's witness keeps that node's checkpoints): a witness that
/// holds nothing while the store holds such checkpoints, or whose newest
/// checkpoint is older than the store's, has gone missing (deleted,
/// emptied or replaced by an old copy). Returns the witnesses' checkpoints
/// for the chain check, or the failure as `(seq, reason)`.
pub fn check_witnesses(
    witnesses: &[Box<dyn Witness>],
    store_cps: &[Checkpoint],
    node: &str,
) -> Result<Vec<Checkpoint>, (u64, String)> {
    let store_last = store_cps
        .iter()
        .filter(|c| c.signed_by(node))
        .map(|c| c.seq)
        .max();
    let mut out = Vec::new();
    for w in witnesses.iter().filter(|w| w.readable()) {
        let held = w
            .read()
            .map_err(|e| (0, format!("witness unreadable: {e}")))?;
        match (held, store_last) {
            (None, None) => {}
            (None, Some(last)) => {
                return Err((
                    last,
                    format!(
                        "the {} holds no checkpoint but the store holds signed checkpoints up to seq {last}: the witness was deleted or emptied (restore it from a backup)",
                        w.name()
                    ),
                ));
            }
            (Some(cps), last) => {
                let newest = cps.iter().map(|c| c.seq).max().unwrap_or(0);
                if let Some(last) = last
                    && newest < last
                {
                    return Err((
                        newest + 1,
                        format!(
                            "the {} ends at seq {newest} but the store holds a checkpoint at seq {last}: the witness is older than the store (replaced or not written)",
                            w.name()
                        ),
                    ));
                }
                out.extend(cps);
            }
        }
    }
    Ok(out)
}

/// Signs a checkpoint every `interval` while events flow.
///
/// INVARIANT: nothing is signed while the chain is known broken: a new
/// checkpoint would vouch for the tampered log.
pub fn spawn(app: Weak<App>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            if app.writes_blocked().is_some() {
                continue;
            }
            match checkpoint_once(app.store.as_ref(), app.signing_key(), &app.witnesses, last).await
            {
                Ok(seq) => last = seq,
                Err(e) => tracing::error!(error = %e, "cannot store audit checkpoint"),
            }
        }
    })
}

/// Verifies the whole log in the background after start-up (start-up itself
/// only affords the tail) and blocks writes if anything does not hold.
pub fn spawn_full_verify(app: Weak<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(app) = app.upgrade() else { return };
        let result = crate::verify::verify_store(
            app.store.as_ref(),
            &app.trusted_keys(),
            &app.config.recordings_dir(),
            &app.witnesses,
            &app.node_id(),
            Some(&|| app.live_sessions()),
        )
        .await;
        match result {
            Ok(r) if r.ok => tracing::info!(events = r.events, "audit log verified"),
            Ok(r) => app.block_writes(format!(
                "seq {}: {}",
                r.first_bad_seq.unwrap_or(0),
                r.reason.unwrap_or_default()
            )),
            // Fail closed: a chain that cannot be verified (an unreadable
            // checkpoint file, a store error) is treated as broken.
            Err(e) => app.block_writes(format!("the audit log cannot be verified: {e}")),
        }
    })
}

/// Checks the part of the chain that start-up can afford: the newest
/// checkpoint's signature, that the log still holds it, and every link after
/// it. Without checkpoints, the whole (short) chain. Returns why the chain is
/// broken, if it is.
pub async fn check_tail(
    store: &dyn Store,
    keys: &[VerifyingKey],
) -> Result<Option<String>, StoreError> {
    let cps = store.checkpoints().await?;
    let Some(cp) = cps.last() else {
        // Without a checkpoint the chain is young: check all of it.
        let mut v = breakglass_store::verify::Verifier::with_keys(Vec::new(), keys);
        for_each_event(store, 0, |e| v.push(e)).await?;
        let v = v.finish();
        return Ok(v
            .reason
            .map(|r| format!("seq {}: {r}", v.first_bad_seq.unwrap_or(0))));
    };
    if !keys.iter().any(|k| cp.verify(k)) {
        return Ok(Some(format!(
            "checkpoint at seq {} has an invalid signature",
            cp.seq
        )));
    }
    // Recompute the checkpointed event itself from its predecessor, so an
    // edited row whose stored hash was left alone is caught too.
    let from = cp.seq.saturating_sub(2);
    let around = store.audit(from, 2).await?;
    let prev = around
        .iter()
        .find(|e| e.seq + 1 == cp.seq)
        .map_or(breakglass_core::audit::GENESIS, |e| e.hash);
    let Some(at) = around.iter().find(|e| e.seq == cp.seq) else {
        return Ok(Some(format!(
            "seq {}: the log no longer holds the signed checkpoint's event (truncated)",
            cp.seq
        )));
    };
    if at.hash != cp.hash {
        return Ok(Some(format!(
            "seq {}: event differs from the signed checkpoint",
            cp.seq
        )));
    }
    let mut check = ChainVerifier::resume(cp.seq - 1, prev);
    if cp.seq > 1 && around.len() < 2 {
        return Ok(Some(format!("seq {}: events missing", cp.seq - 1)));
    }
    if let Err(err) = check.push(at) {
        return Ok(Some(err.to_string()));
    }
    let mut chain = ChainVerifier::resume(cp.seq, cp.hash);
    let mut broken = None;
    for_each_event(store, cp.seq, |e| match chain.push(e) {
        Ok(()) => true,
        Err(err) => {
            broken = Some(err.to_string());
            false
        }
    })
    .await?;
    Ok(broken)
}

/// Reads a checkpoint file, so that verification also holds the log to
/// what was signed outside the database.
/// Lines that do not parse are reported as an error naming the line.
pub fn read_checkpoint_file(path: &Path) -> Result<Vec<Checkpoint>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // A torn last line (crash while appending) is not a checkpoint.
    let whole = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in whole.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cp: Checkpoint = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a checkpoint: {e}", path.display(), i + 1))?;
        out.push(cp);
    }
    Ok(out)
}

/// The checkpoints of the store and of the witnesses, by seq; when several
/// hold one for the same seq, all are checked. A witness that has gone
/// missing is an error naming it and the seq it no longer vouches for.
pub async fn all_checkpoints(
    store: &dyn Store,
    witnesses: &[Box<dyn Witness>],
    node: &str,
) -> Result<Result<Vec<Checkpoint>, (u64, String)>, StoreError> {
    let mut cps = store.checkpoints().await?;
    match check_witnesses(witnesses, &cps, node) {
        Ok(w) => cps.extend(w),
        Err(fail) => return Ok(Err(fail)),
    }
    // The same checkpoint in both places counts once.
    cps.sort_by(|a, b| (a.seq, &a.signature[..]).cmp(&(b.seq, &b.signature[..])));
    cps.dedup();
    Ok(Ok(cps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakglass_core::Timestamp;

    fn cp(key: &SigningKey, seq: u64) -> Checkpoint {
        Checkpoint::sign(key, seq, [seq as u8; 32], Timestamp(seq as i64))
    }

    #[test]
    fn a_witness_that_is_gone_empty_or_behind_fails_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_bytes(&[3; 32]);
        let node = breakglass_core::audit::key_id(&key.verifying_key());
        let file = dir.path().join("w").join("checkpoints.jsonl");
        assert!(prepare_witness_dir(&file).expect("dir"));
        assert!(!prepare_witness_dir(&file).expect("dir"));
        let ws: Vec<Box<dyn Witness>> = vec![Box::new(FileWitness { path: file.clone() })];
        // Nothing anywhere: fine.
        assert_eq!(check_witnesses(&ws, &[], &node), Ok(Vec::new()));
        // The store has checkpoints, the witness none: missing.
        let store = vec![cp(&key, 5), cp(&key, 9)];
        let (seq, why) = check_witnesses(&ws, &store, &node).expect_err("missing");
        assert_eq!(seq, 9);
        assert!(why.contains("holds no checkpoint"), "{why}");
        std::fs::write(&file, "").expect("empty");
        assert!(check_witnesses(&ws, &store, &node).is_err());
        // Behind the store.
        ws[0].record(&cp(&key, 5)).expect("record");
        let (seq, why) = check_witnesses(&ws, &store, &node).expect_err("behind");
        assert_eq!(seq, 6);
        assert!(why.contains("older than the store"), "{why}");
        // A torn line (crash mid-append) is cut before the next append.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(b"{\"seq\":9,\"ha"))
            .expect("tear");
        ws[0].record(&cp(&key, 9)).expect("record");
        let held = check_witnesses(&ws, &store, &node).expect("caught up");
        assert_eq!(held.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 9]);
    }

    #[test]
    fn a_nodes_witness_is_held_only_to_that_nodes_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (
            SigningKey::from_bytes(&[3; 32]),
            SigningKey::from_bytes(&[4; 32]),
        );
        let node_a = breakglass_core::audit::key_id(&a.verifying_key());
        let file = dir.path().join("checkpoints.jsonl");
        let ws: Vec<Box<dyn Witness>> = vec![Box::new(FileWitness { path: file })];
        ws[0].record(&cp(&a, 5)).expect("record");
        // Node B checkpointed later: node A's witness is not behind.
        let store = vec![cp(&a, 5), cp(&b, 9)];
        assert!(check_witnesses(&ws, &store, &node_a).is_ok());
        // A newer checkpoint of node A's own that its witness lacks fails.
        let store = vec![cp(&a, 5), cp(&b, 9), cp(&a, 12)];
        let (seq, _) = check_witnesses(&ws, &store, &node_a).expect_err("behind");
        assert_eq!(seq, 6);
    }
}
