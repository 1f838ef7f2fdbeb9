//! Signed checkpoints of the audit chain: the writer of the log cannot
//! rewrite or truncate history without the signing key, and a copy of every
//! checkpoint can live outside the database (`audit.checkpoint_file`).

use std::io::Write;
use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use breakglass_core::audit::{ChainVerifier, Checkpoint};
use breakglass_store::{Store, StoreError, for_each_event};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::app::{App, now};

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
            let file = app.config.audit.checkpoint_file.as_deref();
            match checkpoint_once(app.store.as_ref(), app.signing_key(), file, last).await {
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
        let key = app.verifying_key();
        let result = crate::verify::verify_store(
            app.store.as_ref(),
            Some(&key),
            &app.config.recordings_dir(),
            app.config.audit.checkpoint_file.as_deref(),
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
    key: &VerifyingKey,
) -> Result<Option<String>, StoreError> {
    let cps = store.checkpoints().await?;
    let Some(cp) = cps.last() else {
        // Without a checkpoint the chain is young: check all of it.
        let mut v = breakglass_store::verify::Verifier::new(Vec::new(), Some(key));
        for_each_event(store, 0, |e| v.push(e)).await?;
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

/// Reads the checkpoints exported to `audit.checkpoint_file`, so that
/// verification also holds the log to what was signed outside the database.
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

/// The checkpoints of the store and of the external file, by seq; when both
/// hold one for the same seq, both are checked.
pub async fn all_checkpoints(
    store: &dyn Store,
    file: Option<&Path>,
) -> Result<Vec<Checkpoint>, String> {
    let mut cps = store.checkpoints().await.map_err(|e| e.to_string())?;
    if let Some(f) = file {
        cps.extend(read_checkpoint_file(f)?);
    }
    // The same checkpoint in both places counts once.
    cps.sort_by(|a, b| (a.seq, &a.signature[..]).cmp(&(b.seq, &b.signature[..])));
    cps.dedup();
    Ok(cps)
}
