//! The domain objects: a break-glass request (which becomes a grant when it is
//! active), its approvals and review, and the principals acting on it.

use std::collections::BTreeSet;
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
}

impl ReviewOutcome {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(ReviewOutcome::Ok),
            "misuse" => Some(ReviewOutcome::Misuse),
            _ => None,
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

/// Someone the service knows: a local principal from the config, or later an
/// identity from an identity provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub groups: BTreeSet<String>,
    /// Member of one of the configured `admin_groups`.
    pub admin: bool,
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
