//! Commands that read the config and the store directly, without a running
//! server: `audit verify`, `policy check` and `store copy`.

use std::path::Path;

use anyhow::{Context, bail};
use breakglass_core::audit::Checkpoint;
use breakglass_core::policy::{Action, PolicyInput};
use breakglass_core::time::parse_duration;
use breakglass_store::{SqliteOptions, SqliteStore};

use crate::app::now;
use crate::config::Config;
use crate::dto::VerifyReport;
use crate::verify::FullVerifier;
use crate::{keys, load_policy};

/// A sample request for `policy check`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub principal: String,
    pub target: String,
    pub role: String,
    pub duration: String,
    pub emergency: bool,
    pub ticket: Option<String>,
}

/// What `policy check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyReport {
    /// Ids of every loaded policy.
    pub policies: Vec<String>,
    /// Rules nobody among the configured principals can satisfy.
    pub warnings: Vec<String>,
    /// With a sample: the decision and why.
    pub sample: Option<SampleDecision>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleDecision {
    pub allowed: bool,
    pub governing: Vec<String>,
    pub explanation: String,
    pub approvals_required: Option<u32>,
    pub approver_groups: Vec<String>,
    pub max_duration_s: Option<u64>,
}

/// Verifies the audit chain, every checkpoint signature, the witnesses and
/// every session, offline (the service is stopped, so no session is live).
/// `trusted`: public keys given from outside the data dir (`--key`); else
/// `audit.verify_keys`; else, with a warning, the key in `data_dir`.
///
/// `since`: an earlier checkpoint (a witness's copy): the newest signed
/// tree head in the store must extend it, shown by a Merkle consistency
/// proof (the log only grew).
pub fn audit_verify(
    config: &Path,
    trusted: &[ed25519_dalek::VerifyingKey],
    since: Option<&Checkpoint>,
) -> anyhow::Result<VerifyReport> {
    let config = Config::load(config)?;
    let database_url = config.database_url()?;
    let db = config.db_path();
    if database_url.is_none() && !db.exists() {
        bail!(
            "no store at {} (has the service ever started with this config?)",
            db.display()
        );
    }
    let mut warnings = Vec::new();
    let keys = if !trusted.is_empty() {
        trusted.to_vec()
    } else if !config.audit.verify_keys.is_empty() {
        config.verify_keys()
    } else {
        warnings.push(format!(
            "no trusted key given (--key or audit.verify_keys): the key in {} was used, so a chain re-signed with a key planted there would pass",
            config.server.data_dir.display()
        ));
        vec![keys::load_public(&config.server.data_dir)?]
    };
    let witnesses = crate::checkpoint::witnesses(&config);
    if witnesses.iter().all(|w| !w.readable()) {
        warnings.push(
            "no checkpoint witness (audit.checkpoint_witness = false): deleting the last events with their checkpoints would pass".into(),
        );
    }
    // The node whose witness and recordings are beside this config.
    let node = keys::load_public(&config.server.data_dir)
        .map(|k| breakglass_core::audit::key_id(&k))
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = match database_url {
        None => {
            let store = SqliteStore::open(&db, SqliteOptions::default())
                .with_context(|| format!("cannot open {}", db.display()))?;
            let mut v = rt
                .block_on(FullVerifier::for_store(&store, &witnesses, &keys, &node))
                .map_err(|e| anyhow::anyhow!("checkpoints: {e}"))?;
            store.scan_audit(0, |e| v.push(&e))?;
            rt.block_on(async {
                let report = v
                    .finish(&store, &config.recordings_dir(), &Default::default())
                    .await?;
                with_since(&store, report, since, &keys).await
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
        }
        Some(url) => rt.block_on(async {
            // Other nodes may be running: their sessions are theirs to
            // check, and this node's are checked against its recordings.
            let store = crate::open_store(&config, Some(&url)).await?;
            let report = crate::verify::verify_store(
                store.as_ref(),
                &keys,
                &config.recordings_dir(),
                &witnesses,
                &node,
                None,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            with_since(store.as_ref(), report, since, &keys)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        })?,
    };
    report.warnings = warnings;
    Ok(report)
}

/// Adds the consistency check from `since` to a report that holds so far.
async fn with_since(
    store: &dyn breakglass_store::Store,
    mut report: VerifyReport,
    since: Option<&Checkpoint>,
    keys: &[ed25519_dalek::VerifyingKey],
) -> Result<VerifyReport, breakglass_store::StoreError> {
    let Some(since) = since else {
        return Ok(report);
    };
    if !report.ok {
        return Ok(report);
    }
    match crate::evidence::consistent_since(store, since, keys).await? {
        Ok(_) => report.consistent_since = Some(since.seq),
        Err(reason) => {
            report.ok = false;
            report.first_bad_seq = Some(since.seq);
            report.reason = Some(reason);
        }
    }
    Ok(report)
}

/// The checkpoint in a file: a checkpoint as JSON, or a witness's
/// `checkpoints.jsonl` (its last line).
pub fn read_since(path: &Path) -> anyhow::Result<Checkpoint> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("--since: cannot open {}", path.display()))?
        .take(SINCE_FILE_LEN_MAX + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("--since: cannot read {}", path.display()))?;
    if text.len() as u64 > SINCE_FILE_LEN_MAX {
        bail!(
            "--since {}: larger than {SINCE_FILE_LEN_MAX} bytes",
            path.display()
        );
    }
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("--since {}: no checkpoint in it", path.display()))?;
    // A whole pretty-printed document is one checkpoint too.
    serde_json::from_str(last)
        .or_else(|_| serde_json::from_str(&text))
        .with_context(|| format!("--since {}: not a checkpoint", path.display()))
}

/// The largest file `--since` reads (a witness's whole checkpoint file).
pub const SINCE_FILE_LEN_MAX: u64 = 256 << 20;

/// What `store copy` moved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub requests: u64,
    pub credentials: u64,
    pub events: u64,
    pub checkpoints: u64,
    pub head_seq: u64,
    pub head_hash: String,
}

/// Copies the embedded store in `data_dir` (its service stopped) into the
/// empty PostgreSQL database at `url`: every request, credential record,
/// event and checkpoint, with `seq`, hashes and signatures unchanged, in one
/// transaction. The source chain is checked link by link as it is copied.
pub fn store_copy(data_dir: &Path, url: &str) -> anyhow::Result<CopyReport> {
    let db = data_dir.join("breakglass.db");
    if !db.exists() {
        bail!(
            "no embedded store at {} (give the data_dir of a node that has run)",
            db.display()
        );
    }
    // The copy is of a stopped node: a running one would go on writing.
    let _lock = crate::datadir::lock(data_dir, "store copy")?;
    let from = SqliteStore::open(&db, SqliteOptions::default())
        .with_context(|| format!("cannot open {}", db.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use breakglass_store::Store;
        let mut requests = Vec::new();
        let mut after = None;
        loop {
            let page = from
                .list(breakglass_store::ListQuery {
                    after: after.clone(),
                    limit: breakglass_store::PAGE_LEN_MAX,
                    ..Default::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            requests.extend(page);
        }
        let credentials = from.credentials_all()?;
        let checkpoints = from.checkpoints().await?.len() as u64;
        let to = breakglass_store::PgStore::open(url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL store: {e}"))?;
        let events = to
            .copy_from(&from, &requests, &credentials)
            .await
            .map_err(|e| anyhow::anyhow!("copy refused: {e}"))?;
        let (head_seq, head_hash) = from.head();
        Ok(CopyReport {
            requests: requests.len() as u64,
            credentials: credentials.len() as u64,
            events,
            checkpoints,
            head_seq,
            head_hash: hex::encode(head_hash),
        })
    })
}

/// Validates the config and its policy file; with a sample, explains which
/// policy governs it.
pub fn policy_check(config: &Path, sample: Option<&Sample>) -> anyhow::Result<PolicyReport> {
    let config = Config::load(config)?;
    let engine = load_policy(&config)?;
    let policies = engine.policy_names();
    let warnings = config.policy_warnings(&engine);
    let Some(s) = sample else {
        return Ok(PolicyReport {
            policies,
            warnings,
            sample: None,
        });
    };
    let principal = config
        .principals
        .iter()
        .find(|p| p.name == s.principal)
        .with_context(|| format!("no principal {:?} in the config", s.principal))?;
    let target = config
        .target(&s.target)
        .with_context(|| format!("no target {:?} in the config", s.target))?;
    if !target.roles.contains_key(&s.role) {
        bail!("target {} has no role {:?}", target.name, s.role);
    }
    let duration_s = parse_duration(&s.duration).map_err(|e| anyhow::anyhow!("duration: {e}"))?;
    let decision = engine.evaluate(&PolicyInput {
        principal: &principal.name,
        principal_groups: &principal.groups,
        kind: breakglass_core::PrincipalKind::Local,
        authn: &breakglass_core::model::LOCAL_AUTHN,
        target: &target.name,
        target_groups: &target.groups,
        action: if s.emergency {
            Action::Emergency
        } else {
            Action::Request
        },
        role: &s.role,
        duration_s,
        reason: "policy check",
        ticket: s.ticket.as_deref(),
        now: now(),
    });
    let mut explanation = decision.explain();
    let mut allowed = decision.allowed;
    if let Some(ob) = &decision.obligations {
        if duration_s > ob.max_duration_s {
            allowed = false;
            explanation.push_str(&format!(
                "; but {} exceeds the maximum duration, so the request would be refused",
                s.duration
            ));
        }
        if let Err(e) = ob.check_ticket(s.ticket.as_deref()) {
            allowed = false;
            explanation.push_str(&format!("; but {e}"));
        }
    }
    let ob = decision.obligations.as_ref();
    Ok(PolicyReport {
        policies,
        warnings,
        sample: Some(SampleDecision {
            allowed,
            governing: decision.governing.clone(),
            explanation,
            approvals_required: ob.map(|o| o.approvals),
            approver_groups: ob
                .map_or_else(Vec::new, |o| o.approver_groups.iter().cloned().collect()),
            max_duration_s: ob.map(|o| o.max_duration_s),
        }),
    })
}
