//! The JSON bodies of the HTTP API, shared by the server and the CLI client
//! so both sides always agree. The request object itself is
//! [`breakglass_core::Request`].

use breakglass_core::audit::AuditEventJson;
use breakglass_core::{Request, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/requests`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub target: String,
    pub role: String,
    /// Like `90s`, `15m`, `1h`.
    pub duration: String,
    pub reason: String,
    #[serde(default)]
    pub ticket: Option<String>,
    #[serde(default)]
    pub emergency: bool,
    /// Labels the request as made by this configured drill. Only that
    /// drill's requester principal may set it, and only for the drill's
    /// target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

/// `POST /v1/requests/{id}/approve` (also countersigns an emergency grant).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    #[serde(default)]
    pub comment: Option<String>,
}

/// `POST /v1/requests/{id}/deny` and `/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    pub reason: String,
}

/// `POST /v1/requests/{id}/review`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    /// `ok` or `misuse`.
    pub outcome: String,
    pub notes: String,
}

/// `GET /v1/requests`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestList {
    pub requests: Vec<Request>,
    /// Pass as `after` to get the next page; null on the last page.
    pub next: Option<String>,
}

/// `POST /v1/requests/{id}/credentials`: shown once, stored only as a hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Credentials {
    pub token: String,
    pub request_id: String,
    pub requester: String,
    pub target: String,
    pub role: String,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    /// What the target's gateway expects, when one is configured.
    pub connection: Option<Connection>,
    /// SSH targets, when `ssh_public_key` was sent: an OpenSSH user
    /// certificate for that key, standing for this credential, valid until
    /// `expires_at`; the gateway accepts it instead of the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_certificate: Option<String>,
}

/// `POST /v1/requests/{id}/credentials` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialsBody {
    /// An OpenSSH public key line (ed25519 or ECDSA, at most 8 KiB): for an
    /// SSH target, the answer has a certificate for it.
    #[serde(default)]
    #[schema(
        max_length = 8192,
        pattern = r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}( [^\n]*)?\n?$"
    )]
    pub ssh_public_key: Option<String>,
}

/// How to reach the target through its gateway with these credentials.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Connection {
    pub kind: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: Option<String>,
    /// SSH: the gateway's host key (`ssh-ed25519 AAAA...`), for the
    /// client's known hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// SSH: its fingerprint (`SHA256:...`), as the ssh client shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_fingerprint: Option<String>,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub groups: Vec<String>,
    pub admin: bool,
    /// `human` (identity provider), `workload` or `local`.
    #[serde(default = "default_kind")]
    pub kind: breakglass_core::PrincipalKind,
    /// `oidc`, `workload`, `local` or `local+totp`.
    #[serde(default = "default_auth_method")]
    pub auth_method: breakglass_core::AuthMethod,
    /// When the token expires (null for a local token).
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<breakglass_core::Timestamp>,
    /// When the person last signed in at the identity provider (or showed
    /// a TOTP code); null when unknown.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub auth_time: Option<breakglass_core::Timestamp>,
}

fn default_kind() -> breakglass_core::PrincipalKind {
    breakglass_core::PrincipalKind::Local
}

fn default_auth_method() -> breakglass_core::AuthMethod {
    breakglass_core::AuthMethod::Local
}

/// `GET /v1/auth/config`: how a client signs people in.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuthConfig {
    /// Null when no identity provider is configured (local principals
    /// only).
    pub oidc: Option<OidcClientConfig>,
}

/// The identity provider a client signs people in with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OidcClientConfig {
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready`.
    pub status: String,
    /// `ok`, `degraded` (an identity provider is unreachable: cached keys
    /// keep working) or `off` (none configured).
    pub identity: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub events: Vec<AuditEventJson>,
    /// Pass as `after` to continue; null when there is nothing more now.
    pub next: Option<u64>,
}

/// `GET /v1/audit/verify` and `breakglass audit verify`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    /// Events checked.
    pub events: u64,
    /// Signed checkpoints checked.
    pub checkpoints: u64,
    /// Session recordings checked against their `session.ended` event.
    #[serde(default)]
    pub recordings: u64,
    pub head_seq: u64,
    pub head_hash: String,
    /// The first `seq` where the chain or a checkpoint does not hold.
    pub first_bad_seq: Option<u64>,
    pub reason: Option<String>,
    /// What this verification could not rule out (no trusted key given
    /// from outside the data dir, no witness).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The root of the Merkle tree over the `head_seq` events verified
    /// (hex), as a checkpoint at `head_seq` would sign it.
    #[serde(default)]
    pub tree_root: String,
    /// With `--since CHECKPOINT`: the seq of that checkpoint, proven to be
    /// a prefix of this log by a consistency proof to the newest signed
    /// tree head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_since: Option<u64>,
}

/// An RFC 9457 problem document. `code` is stable; `detail` is for people.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
}

impl From<breakglass_store::verify::Verification> for VerifyReport {
    fn from(v: breakglass_store::verify::Verification) -> Self {
        VerifyReport {
            ok: v.ok,
            events: v.events,
            checkpoints: v.checkpoints,
            recordings: 0,
            head_seq: v.head_seq,
            head_hash: v.head_hash,
            first_bad_seq: v.first_bad_seq,
            reason: v.reason,
            warnings: Vec::new(),
            tree_root: hex::encode(v.tree_root),
            consistent_since: None,
        }
    }
}

/// One gateway session of a grant, from its audit events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionSummary {
    pub session_id: String,
    pub request_id: String,
    pub principal: String,
    pub target: Option<String>,
    pub role: Option<String>,
    pub upstream_user: Option<String>,
    pub client: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<String>,
    pub statements: Option<u64>,
    pub recording_sha256: Option<String>,
}

/// `GET /v1/requests/{id}/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionSummary>,
}

/// `GET /v1/sessions/{id}/recording`: entries in order, chain verified.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecordingPage {
    pub session_id: String,
    pub request_id: String,
    /// Entries with `seq` greater than the `after` asked for.
    #[schema(value_type = Vec<Object>)]
    pub entries: Vec<serde_json::Value>,
    /// Pass as `after` to continue; null at the end.
    pub next: Option<u64>,
    /// The recording has its `end` entry (the session is over).
    pub complete: bool,
}

/// `GET /v1/targets`: what the caller may request now, as the policy engine
/// decides it for each configured target, role and action.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetList {
    pub targets: Vec<TargetOption>,
}

/// One target, role and action the caller may request, with the
/// obligations of the policies that govern it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetOption {
    pub target: String,
    /// `postgres`, `ssh` or `generic`.
    pub kind: String,
    pub role: String,
    /// `true`: self-activating emergency access (`request --emergency`).
    pub emergency: bool,
    /// The longest grant that may be asked for, in seconds.
    pub max_duration_s: u64,
    pub approvals_required: u32,
    /// Who approves (and countersigns).
    pub approver_groups: Vec<String>,
    /// Patterns the ticket must match; empty when no ticket is needed.
    pub ticket_patterns: Vec<String>,
    /// Emergency grants must be countersigned within this many seconds.
    pub countersign_within_s: Option<u64>,
    /// The `@id`s of the governing permits.
    pub policies: Vec<String>,
}
