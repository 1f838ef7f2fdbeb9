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

/// Verifies the audit chain and every checkpoint signature, offline, from
/// the store and public key in the config's `data_dir`.
pub fn audit_verify(config: &Path) -> anyhow::Result<VerifyReport> {
    let config = Config::load(config)?;
    let db = config.db_path();
    if !db.exists() {
        bail!(
            "no store at {} (has the service ever started with this config?)",
            db.display()
        );
    }
    let key = keys::load_public(&config.server.data_dir)?;
    let store = SqliteStore::open(&db, SqliteOptions::default())
        .with_context(|| format!("cannot open {}", db.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let checkpoints = rt
        .block_on(crate::checkpoint::all_checkpoints(
            &store,
            config.audit.checkpoint_file.as_deref(),
        ))
        .map_err(|e| anyhow::anyhow!("checkpoints: {e}"))?;
    let mut v = FullVerifier::new(checkpoints, Some(&key));
    store.scan_audit(0, |e| v.push(&e))?;
    Ok(v.finish(&config.recordings_dir()))
}

/// Validates the config and its policy file; with a sample, explains which
/// policy governs it.
pub fn policy_check(config: &Path, sample: Option<&Sample>) -> anyhow::Result<PolicyReport> {
    let config = Config::load(config)?;
    let engine = load_policy(&config)?;
    let policies = engine.policy_names();
    let warnings = engine.warnings(&config.policy_principals());
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
