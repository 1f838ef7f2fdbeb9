//! Commands that read the config and the store directly, without a running
//! server: `audit verify` and `policy check`.

use std::path::Path;

use anyhow::{Context, bail};
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
pub fn audit_verify(
    config: &Path,
    trusted: &[ed25519_dalek::VerifyingKey],
) -> anyhow::Result<VerifyReport> {
    let config = Config::load(config)?;
    let db = config.db_path();
    if !db.exists() {
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
    if witnesses.is_empty() {
        warnings.push(
            "no checkpoint witness (audit.checkpoint_witness = false): deleting the last events with their checkpoints would pass".into(),
        );
    }
    let store = SqliteStore::open(&db, SqliteOptions::default())
        .with_context(|| format!("cannot open {}", db.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut v = rt
        .block_on(FullVerifier::for_store(&store, &witnesses, &keys))
        .map_err(|e| anyhow::anyhow!("checkpoints: {e}"))?;
    store.scan_audit(0, |e| v.push(&e))?;
    let mut report = v.finish(&config.recordings_dir(), &Default::default());
    report.warnings = warnings;
    Ok(report)
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
