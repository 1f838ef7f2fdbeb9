//! The domain objects: a break-glass request (which becomes a grant when it is
//! active), its approvals and review, and the principals acting on it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::time::Timestamp;

/// Limits on the free-text fields a person types. Named with the unit last.
pub const REASON_LEN_MAX: usize = 1024;
pub const TICKET_LEN_MAX: usize = 128;
pub const NAME_LEN_MAX: usize = 128;
pub const COMMENT_LEN_MAX: usize = 1024;
pub const NOTES_LEN_MAX: usize = 4096;
/// Why a character may not appear in a text field, if it may not: control
/// characters (except tab and newline in free text), and the invisible
/// formatting characters that make a text display differently from what it
/// says (bidirectional overrides, embeddings and isolates, direction marks,
/// zero-width characters, line and paragraph separators).
pub fn forbidden_char(c: char) -> Option<&'static str> {
    match c {
        '\n' | '\t' => None,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => Some("a bidirectional override"),
        '\u{200E}' | '\u{200F}' | '\u{061C}' => Some("a direction mark"),
        '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{180E}' | '\u{00AD}' => {
            Some("an invisible character")
        }
        '\u{2028}' | '\u{2029}' => Some("a line separator"),
        c if c.is_control() => Some("a control character"),
        _ => None,
    }
}

/// Checks that a text field has none of the [`forbidden_char`]s; the error
/// names the field, the kind of character and where it is.
pub fn check_text_chars(field: &str, value: &str) -> Result<(), String> {
    match value
        .chars()
        .enumerate()
        .find_map(|(i, c)| forbidden_char(c).map(|why| (i, c, why)))
    {
        Some((i, c, why)) => Err(format!(
            "{field} contains {why} (U+{:04X} at character {}); remove it",
            c as u32,
            i + 1
        )),
        None => Ok(()),
    }
}

/// Upper bound on `@approvals`: more than this is a policy mistake, not rigour.
pub const APPROVALS_MAX: u32 = 10;

/// The lifecycle state of a request (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Active,
    Denied,
    Cancelled,
    TimedOut,
    Expired,
    Revoked,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Pending,
        State::Active,
        State::Denied,
        State::Cancelled,
        State::TimedOut,
        State::Expired,
        State::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::Denied => "denied",
            State::Cancelled => "cancelled",
            State::TimedOut => "timed_out",
            State::Expired => "expired",
            State::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A final state never changes again (DESIGN §2).
    pub fn is_final(self) -> bool {
        !matches!(self, State::Pending | State::Active)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request reached its final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Denied,
    Cancelled,
    TimedOut,
    Expired,
    /// Ended early by the requester.
    Released,
    /// Ended early by an approver or an admin.
    Revoked,
    /// An emergency grant nobody countersigned in time.
    NotCountersigned,
    /// The requester is no longer a known principal (removed from the
    /// config, or unknown to the identity provider).
    PrincipalRemoved,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Denied => "denied",
            EndReason::Cancelled => "cancelled",
            EndReason::TimedOut => "timed_out",
            EndReason::Expired => "expired",
            EndReason::Released => "released",
            EndReason::Revoked => "revoked",
            EndReason::NotCountersigned => "not_countersigned",
            EndReason::PrincipalRemoved => "principal_removed",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    pub by: String,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReviewOutcome {
    Ok,
    Misuse,
    /// Closed by the service: nothing in the grant's summary needed a
    /// person. Only the service records it, and the service records nothing
    /// else (`lifecycle::step`).
    AutoOk,
}

impl ReviewOutcome {
    /// The outcomes a person may give (`auto_ok` is not one of them).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(ReviewOutcome::Ok),
            "misuse" => Some(ReviewOutcome::Misuse),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReviewOutcome::Ok => "ok",
            ReviewOutcome::Misuse => "misuse",
            ReviewOutcome::AutoOk => "auto_ok",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Review {
    pub by: String,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    pub outcome: ReviewOutcome,
    pub notes: String,
}

/// A break-glass request. While `state == active` it is a grant.
///
/// The fields named in DESIGN §7 are the contract; the others (`approver_groups`,
/// `max_duration_s`, deadlines, `version`) make the object self-contained, so a
/// lifecycle step needs nothing but the request, the actor and `now`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Request {
    pub id: String,
    pub requester: String,
    pub target: String,
    pub role: String,
    pub reason: String,
    pub ticket: Option<String>,
    pub emergency: bool,
    pub state: State,
    /// The governing policies' ids, comma-separated.
    pub policy: String,
    pub approvals_required: u32,
    /// Groups whose members (other than the requester) may approve, deny,
    /// countersign and review.
    pub approver_groups: Vec<String>,
    pub approvals: Vec<Approval>,
    pub duration_s: u64,
    pub max_duration_s: u64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// A pending request times out at this moment.
    #[schema(value_type = String, format = DateTime)]
    pub pending_until: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub activated_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// For an emergency grant whose policy sets `@countersign_within`: the
    /// moment it is revoked unless countersigned.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub countersign_by: Option<Timestamp>,
    pub countersignature: Option<Approval>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<EndReason>,
    /// Who ended it (denied, cancelled, revoked), or `system`.
    pub ended_by: Option<String>,
    /// The reason given by whoever ended it.
    pub end_comment: Option<String>,
    pub review_required: bool,
    pub review: Option<Review>,
    /// Set when the service queued the ended grant for a person's review
    /// (`review.queued`): the review is due by then, and overdue after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub review_due_at: Option<Timestamp>,
    /// The service has recorded `review.overdue` for this grant (once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review_overdue: bool,
    /// The automated review's findings, counted by rule (for reports; the
    /// findings themselves are in the triage event's summary).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub review_findings: BTreeMap<String, u64>,
    /// From the governing policies' `@approver_fresh_auth`: approvals,
    /// denials and countersignatures need an approver who authenticated
    /// within this many seconds (or a local principal with TOTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver_fresh_auth_s: Option<u64>,
    /// The name of the drill that made this request, for requests a drill
    /// (or its load generator) makes; `null` for real use. Reviews, reports
    /// and the console keep drills apart from real use by this label.
    #[serde(default)]
    pub drill: Option<String>,
    /// Bumped by every transition; the store applies transitions as
    /// compare-and-set on it.
    pub version: u64,
}

impl Request {
    /// The next moment at which the scheduler must act on this request, if any.
    pub fn deadline(&self) -> Option<Timestamp> {
        match self.state {
            State::Pending => Some(self.pending_until),
            State::Active => {
                let countersign = match (self.countersign_by, &self.countersignature) {
                    (Some(by), None) => Some(by),
                    _ => None,
                };
                match (self.expires_at, countersign) {
                    (Some(e), Some(c)) => Some(e.min(c)),
                    (e, c) => e.or(c),
                }
            }
            _ => None,
        }
    }

    /// Whether this request is a live grant at `now`: active, before
    /// `expires_at`, and (for an emergency grant still waiting for its
    /// countersignature) before `countersign_by`, whatever the scheduler has
    /// or has not done yet.
    pub fn is_live(&self, now: Timestamp) -> bool {
        // INVARIANT: a passed countersignature deadline ends the grant at
        // every use, exactly like a passed expiry (`deadline` is the earlier
        // of the two).
        self.state == State::Active
            && self.expires_at.is_some()
            && self.deadline().is_some_and(|d| now < d)
    }

    /// Why a grant is not live at `now`: its stored end reason, or, for an
    /// active grant past its deadline the scheduler has not written yet, the
    /// reason it will get. `None` while pending or live.
    pub fn ended_because(&self, now: Timestamp) -> Option<EndReason> {
        match self.state {
            State::Pending => None,
            State::Active if self.is_live(now) => None,
            State::Active => Some(if self.countersign_missed(now) {
                EndReason::NotCountersigned
            } else {
                EndReason::Expired
            }),
            s => Some(self.end_reason.unwrap_or(match s {
                State::Denied => EndReason::Denied,
                State::Cancelled => EndReason::Cancelled,
                State::TimedOut => EndReason::TimedOut,
                State::Expired => EndReason::Expired,
                _ => EndReason::Revoked,
            })),
        }
    }

    /// Whether the countersignature deadline of an active grant has passed
    /// without a countersignature (and before the grant would have expired).
    pub fn countersign_missed(&self, now: Timestamp) -> bool {
        match (self.countersign_by, &self.countersignature) {
            (Some(by), None) => self.expires_at.is_none_or(|e| by <= e) && now >= by,
            _ => false,
        }
    }

    /// When an active grant ends (or ended) at the latest: the earlier of
    /// `expires_at` and a pending countersignature deadline; for an ended
    /// request, `ended_at`.
    pub fn ends_at(&self) -> Option<Timestamp> {
        match self.state {
            State::Pending => None,
            State::Active => self.deadline(),
            _ => self.ended_at,
        }
    }

    pub fn is_eligible_approver(&self, who: &Principal) -> bool {
        who.name != self.requester && self.approver_groups.iter().any(|g| who.groups.contains(g))
    }
}

/// Where a principal comes from (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A person, from the organisation's identity provider (OIDC).
    Human,
    /// A CI/CD or cloud workload's token: may request and wait, never
    /// approve, deny, countersign or review.
    Workload,
    /// A principal of the config (`[[principals]]`).
    Local,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Human => "human",
            PrincipalKind::Workload => "workload",
            PrincipalKind::Local => "local",
        }
    }
}

/// How a principal authenticated, as every audit event records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum AuthMethod {
    /// An ID token of the organisation's identity provider.
    #[serde(rename = "oidc")]
    Oidc,
    /// A workload's OIDC token.
    #[serde(rename = "workload")]
    Workload,
    /// A local principal's token.
    #[serde(rename = "local")]
    Local,
    /// A local principal's token and a TOTP code.
    #[serde(rename = "local+totp")]
    LocalTotp,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Oidc => "oidc",
            AuthMethod::Workload => "workload",
            AuthMethod::Local => "local",
            AuthMethod::LocalTotp => "local+totp",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the service knows about one authentication of a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authn {
    pub method: AuthMethod,
    /// When the person last authenticated at the identity provider (the
    /// token's `auth_time`); for a local principal with TOTP, when the code
    /// was checked.
    pub auth_time: Option<Timestamp>,
    /// When the token was issued (`iat`), if it is one.
    pub issued_at: Option<Timestamp>,
    /// When the token expires (`exp`), if it is one.
    pub expires_at: Option<Timestamp>,
    /// A second factor was shown: `amr` names one of the configured
    /// methods, or a local principal gave a TOTP code.
    pub mfa: bool,
    /// The claims a workload entry matched (its `claims` and the template's
    /// placeholders), shown to policy as the principal's tags.
    pub claims: BTreeMap<String, String>,
}

/// Seconds reported as `context.auth_age_s` when nothing says when the
/// principal authenticated (a plain local token): about 31 years, more
/// than any window a policy compares with.
pub const AUTH_AGE_UNKNOWN_S: i64 = 1_000_000_000;

impl Authn {
    /// A local principal's token without a second factor.
    pub const LOCAL: Authn = Authn {
        method: AuthMethod::Local,
        auth_time: None,
        issued_at: None,
        expires_at: None,
        mfa: false,
        claims: BTreeMap::new(),
    };

    /// Seconds since the principal authenticated at `now`: from
    /// `auth_time`, else from the token's `iat`, else
    /// [`AUTH_AGE_UNKNOWN_S`]. Never negative.
    pub fn age_s(&self, now: Timestamp) -> i64 {
        match self.auth_time.or(self.issued_at) {
            Some(t) => ((now.millis() - t.millis()) / 1000).max(0),
            None => AUTH_AGE_UNKNOWN_S,
        }
    }

    /// Whether this authentication is fresh enough for a window of
    /// `window_s`: a local principal's TOTP code counts as fresh (it was
    /// just shown); otherwise `auth_time` must be within the window.
    pub fn is_fresh(&self, window_s: u64, now: Timestamp) -> bool {
        if self.method == AuthMethod::LocalTotp {
            return true;
        }
        self.auth_time.is_some_and(|t| {
            let age_ms = now.millis().saturating_sub(t.millis());
            age_ms <= (window_s as i64).saturating_mul(1000)
        })
    }
}

/// [`Authn::LOCAL`] as a static, for borrowing.
pub static LOCAL_AUTHN: Authn = Authn::LOCAL;

/// Someone the service knows: a person from the identity provider, a
/// workload, or a local principal of the config, with how it authenticated
/// for the call at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub groups: BTreeSet<String>,
    /// Member of one of the configured `admin_groups`.
    pub admin: bool,
    pub kind: PrincipalKind,
    pub authn: Authn,
}

impl Principal {
    /// A local principal authenticated by its token alone.
    pub fn local(name: impl Into<String>, groups: BTreeSet<String>, admin: bool) -> Principal {
        Principal {
            name: name.into(),
            groups,
            admin,
            kind: PrincipalKind::Local,
            authn: Authn::LOCAL,
        }
    }
}

/// Who causes a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Principal(Principal),
    /// The service itself: expiry, timeouts, missed countersignatures.
    System,
}

impl Actor {
    pub fn name(&self) -> &str {
        match self {
            Actor::Principal(p) => &p.name,
            Actor::System => "system",
        }
    }

    /// How the actor authenticated; `None` for the service itself.
    pub fn auth_method(&self) -> Option<AuthMethod> {
        match self {
            Actor::Principal(p) => Some(p.authn.method),
            Actor::System => None,
        }
    }
}

#[cfg(test)]
mod text_tests {
    use super::check_text_chars;

    #[test]
    fn hidden_and_control_characters_are_named() {
        assert!(check_text_chars("reason", "db down\n\tsee INC-1").is_ok());
        assert!(check_text_chars("reason", "Ünïcödé ✓ 日本").is_ok());
        for (text, why) in [
            ("ok\u{202E}gnp.exe", "bidirectional override"),
            ("a\u{2066}b", "bidirectional override"),
            ("a\u{200F}b", "direction mark"),
            ("a\u{200B}b", "invisible character"),
            ("a\u{0007}b", "control character"),
            ("a\rb", "control character"),
            ("a\u{0085}b", "control character"),
            ("a\u{2028}b", "line separator"),
        ] {
            let e = check_text_chars("reason", text).expect_err(text);
            assert!(e.starts_with("reason contains"), "{e}");
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
