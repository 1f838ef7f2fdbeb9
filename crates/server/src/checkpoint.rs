//! Signed checkpoints of the audit chain: the writer of the log cannot
//! rewrite or truncate history without the signing key, and a copy of every
//! checkpoint can live outside the database (`audit.checkpoint_file`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use breakglass_core::audit::{ChainVerifier, Checkpoint};
use breakglass_store::{PAGE_LEN_MAX, Store, StoreError};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::app::now;

/// Signs the current head if it moved since `last_seq`; returns the new
/// checkpointed seq.
pub async fn checkpoint_once(
    store: &dyn Store,
    key: &SigningKey,
    file: Option<&Path>,
    last_seq: u64,
) -> Result<u64, StoreError> {
    let (seq, hash) = store.head();
    if seq == 0 || seq == last_seq {
        return Ok(last_seq);
    }
    let cp = Checkpoint::sign(key, seq, hash, now());
    store.add_checkpoint(cp.clone()).await?;
    if let Some(path) = file
        && let Err(e) = append_line(path, &cp)
    {
        // The database copy exists; the external copy is best effort but loud.
        tracing::error!(file = %path.display(), error = %e, "cannot append checkpoint to checkpoint_file");
    }
    Ok(seq)
}

fn append_line(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let line = serde_json::to_string(cp).map_err(std::io::Error::other)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// Signs a checkpoint every `interval` while events flow.
pub fn spawn(
    store: Arc<dyn Store>,
    key: SigningKey,
    file: Option<PathBuf>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match checkpoint_once(store.as_ref(), &key, file.as_deref(), last).await {
                Ok(seq) => last = seq,
                Err(e) => tracing::error!(error = %e, "cannot store audit checkpoint"),
            }
        }
    })
}

/// Checks the part of the chain that start-up can afford: the newest
/// checkpoint's signature, that the log still holds it, and every link after
/// it. Without checkpoints, the whole (short) chain. Returns why the chain is
/// broken, if it is.
pub async fn check_tail(
    store: &dyn Store,
    key: &VerifyingKey,
) -> Result<Option<String>, StoreError> {
    let cps = store.checkpoints().await?;
    let Some(cp) = cps.last() else {
        // Without a checkpoint the chain is young: check all of it.
        let mut v = breakglass_store::verify::Verifier::new(Vec::new(), Some(key));
        let mut after = 0;
        loop {
            let page = store.audit(after, PAGE_LEN_MAX).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            if !page.iter().all(|e| v.push(e)) || page.len() < PAGE_LEN_MAX as usize {
                break;
            }
        }
        let v = v.finish();
        return Ok(v
            .reason
            .map(|r| format!("seq {}: {r}", v.first_bad_seq.unwrap_or(0))));
    };
    if !cp.verify(key) {
        return Ok(Some(format!(
            "checkpoint at seq {} has an invalid signature",
            cp.seq
        )));
    }
    let at = store.audit(cp.seq - 1, 1).await?;
    match at.first() {
        Some(e) if e.seq == cp.seq && e.hash == cp.hash => {}
        Some(e) if e.seq == cp.seq => {
            return Ok(Some(format!(
                "seq {}: event differs from the signed checkpoint",
                cp.seq
            )));
        }
        _ => {
            return Ok(Some(format!(
                "seq {}: the log no longer holds the signed checkpoint's event (truncated)",
                cp.seq
            )));
        }
    }
    let mut chain = ChainVerifier::resume(cp.seq, cp.hash);
    let mut after = cp.seq;
    loop {
        let page = store.audit(after, PAGE_LEN_MAX).await?;
        for e in &page {
            if let Err(err) = chain.push(e) {
                return Ok(Some(err.to_string()));
            }
        }
        match page.last() {
            Some(last) if page.len() as u32 == PAGE_LEN_MAX => after = last.seq,
            _ => break,
        }
    }
    Ok(None)
}
