//! Commands that read the config and the store directly, without a running
//! server: `audit verify`, `audit export` and `policy check`.

use std::path::Path;

use crate::dto::VerifyReport;

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

/// Verifies the audit chain, every checkpoint signature, offline.
pub fn audit_verify(config: &Path) -> anyhow::Result<VerifyReport> {
    let _ = config;
    anyhow::bail!("not implemented yet")
}

/// Validates the config and its policy file; with a sample, explains which
/// policy governs it.
pub fn policy_check(config: &Path, sample: Option<&Sample>) -> anyhow::Result<PolicyReport> {
    let _ = (config, sample);
    anyhow::bail!("not implemented yet")
}
