//! The request lifecycle as a pure state machine (DESIGN §2).
//!
//! `create` turns a policy decision into a new request; `step` applies one
//! command to an existing request at a given `now`. Both return a
//! [`Transition`]: the request as it must be stored and the audit events that
//! must be committed with it, or neither. Authorization that depends on the
//! request (who may approve, deny, revoke, review) is decided here too, so it
//! is the same for every caller.

use serde_json::json;
use thiserror::Error;

use crate::model::{
    Actor, Approval, COMMENT_LEN_MAX, EndReason, NAME_LEN_MAX, NOTES_LEN_MAX, Principal,
    PrincipalKind, REASON_LEN_MAX, Request, Review, ReviewOutcome, State, TICKET_LEN_MAX,
};
use crate::policy::Decision;
use crate::time::{DURATION_MAX_S, Timestamp, format_duration};

/// What a requester asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    pub target: String,
    pub role: String,
    pub duration_s: u64,
    pub reason: String,
    pub ticket: Option<String>,
    pub emergency: bool,
    /// The drill this request belongs to; the caller has checked that the
    /// requester may set it.
    pub drill: Option<String>,
}

/// A command applied to an existing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Approve a pending request, or countersign an active emergency grant.
    Approve {
        comment: Option<String>,
    },
    Deny {
        reason: String,
    },
    Cancel,
    /// End an active grant early: a release when the requester does it.
    Revoke {
        reason: String,
    },
    Review {
        outcome: ReviewOutcome,
        notes: String,
    },
    /// Apply whatever deadline has passed at `now` (system only).
    Tick,
    /// The requester is no longer a known principal (system only): a
    /// pending request is cancelled, an active grant revoked, both with end
    /// reason `principal_removed`.
    Offboard,
    /// The automated review of an ended grant (system only). The grant goes
    /// to a person (`review.queued`, due at `due_at`) when it is an
    /// emergency grant, its policy says `@review("always")`, or `flagged`
    /// names why its summary needs one; otherwise it is closed with outcome
    /// `auto_ok` (`request.reviewed`). Either event carries `evidence` (the
    /// summary).
    Triage {
        flagged: Vec<String>,
        findings: std::collections::BTreeMap<String, u64>,
        evidence: serde_json::Value,
        due_at: Timestamp,
    },
    /// A queued review passed its due time (system only): records
    /// `review.overdue` once.
    ReviewOverdue,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Approve { .. } => "approve",
            Command::Deny { .. } => "deny",
            Command::Cancel => "cancel",
            Command::Revoke { .. } => "revoke",
            Command::Review { .. } => "review",
            Command::Tick => "tick",
            Command::Offboard => "offboard",
            Command::Triage { .. } => "triage",
            Command::ReviewOverdue => "mark overdue",
        }
    }
}

/// An audit event before the store gives it a `seq` and a place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDraft {
    pub actor: String,
    pub action: String,
    pub request_id: Option<String>,
    pub details: serde_json::Value,
}

/// The outcome of a successful step: the new request (version bumped) and its
/// events. `expected_version` is the version the step was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub expected_version: u64,
    pub request: Request,
    pub events: Vec<EventDraft>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no policy permits this: {0}")]
    PolicyDenied(String),
    #[error(
        "requested duration {} exceeds the maximum of {} set by policy {policy}",
        format_duration(*requested_s),
        format_duration(*max_s)
    )]
    DurationExceedsPolicy {
        requested_s: u64,
        max_s: u64,
        policy: String,
    },
    #[error("{0}")]
    Ticket(String),
    #[error("the requester cannot approve, deny, countersign or review their own request")]
    SelfApproval,
    #[error("{who} is not an eligible approver for this request (eligible groups: {groups})")]
    NotEligible { who: String, groups: String },
    #[error("only the requester can {0} this request")]
    NotRequester(&'static str),
    #[error(
        "{who} may not revoke this grant: only the requester, an eligible approver or an admin can"
    )]
    NotAllowedToRevoke { who: String },
    #[error("{0} has already approved this request")]
    AlreadyApproved(String),
    #[error("this request has already been reviewed")]
    AlreadyReviewed,
    #[error("cannot {action} a request that is {state}{detail}")]
    WrongState {
        action: &'static str,
        state: State,
        detail: String,
    },
    #[error("nothing is due")]
    NotDue,
    /// Workloads request and wait; approvals are by people.
    #[error(
        "{who} is a workload: workloads may request and wait, but never {action} (approvals are by people)"
    )]
    WorkloadNotAllowed { who: String, action: &'static str },
    /// The governing policy wants a recent sign-in of the approver.
    #[error(
        "{who} must have signed in within the last {} to {action} this request (policy @approver_fresh_auth); run `breakglass login --fresh` and try again",
        format_duration(*window_s)
    )]
    StepUpRequired {
        who: String,
        action: &'static str,
        window_s: u64,
    },
    /// The governing policy wants the requester to have shown a second
    /// factor.
    #[error(
        "policy {policy} requires a second factor (@require_mfa) and {who}'s sign-in shows none; run `breakglass login --fresh` and sign in with a second factor"
    )]
    MfaRequired { who: String, policy: String },
    /// A new emergency request is refused because of another emergency
    /// request of the same principal.
    #[error("emergency access refused: {reason}")]
    EmergencyBlocked {
        /// The request that blocks it.
        blocking: String,
        reason: String,
    },
}

fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), LifecycleError> {
    if required && value.trim().is_empty() {
        return Err(LifecycleError::Invalid(format!(
            "{field} must not be empty"
        )));
    }
    if value.len() > max {
        return Err(LifecycleError::Invalid(format!(
            "{field} is {} bytes long, the limit is {max}",
            value.len()
        )));
    }
    crate::model::check_text_chars(field, value).map_err(LifecycleError::Invalid)
}

/// Validates a name (target, role, principal): printable, no spaces, bounded.
pub fn check_name(field: &str, value: &str) -> Result<(), LifecycleError> {
    check_text(field, value, NAME_LEN_MAX, true)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
    {
        return Err(LifecycleError::Invalid(format!(
            "{field} {value:?} may only contain letters, digits and - _ . @ :"
        )));
    }
    Ok(())
}

fn wrong_state(action: &'static str, req: &Request, detail: &str) -> LifecycleError {
    LifecycleError::WrongState {
        action,
        state: req.state,
        detail: detail.to_string(),
    }
}

/// The actor name of everything the service does by itself.
pub const SYSTEM: &str = "system";

fn event(actor: &str, action: &str, req: &Request, details: serde_json::Value) -> EventDraft {
    EventDraft {
        actor: actor.to_string(),
        action: action.to_string(),
        request_id: Some(req.id.clone()),
        details,
    }
}

/// An event caused by a principal: its details also record how the
/// principal authenticated (`auth_method`).
fn event_by(p: &Principal, action: &str, req: &Request, details: serde_json::Value) -> EventDraft {
    let mut details = details;
    if let Some(map) = details.as_object_mut() {
        map.insert("auth_method".into(), json!(p.authn.method.as_str()));
    }
    event(&p.name, action, req, details)
}

fn activate(req: &mut Request, now: Timestamp, events: &mut Vec<EventDraft>, actor: &Principal) {
    req.state = State::Active;
    req.activated_at = Some(now);
    let expires = now.plus_secs(req.duration_s);
    req.expires_at = Some(expires);
    if req.emergency {
        req.review_required = true;
    }
    let mut details = json!({
        "expires_at": expires.to_rfc3339(),
        "duration_s": req.duration_s,
        "emergency": req.emergency,
    });
    if let Some(by) = req.countersign_by {
        details["countersign_by"] = json!(by.to_rfc3339());
    }
    events.push(event_by(actor, "request.activated", req, details));
}

/// Creates a request from what the requester asked and the policy decision
/// for it. A request whose policy needs no approval is active at once.
pub fn create(
    input: &NewRequest,
    requester: &Principal,
    decision: &Decision,
    id: String,
    now: Timestamp,
    pending_timeout_s: u64,
) -> Result<Transition, LifecycleError> {
    check_name("target", &input.target)?;
    check_name("role", &input.role)?;
    check_text("reason", &input.reason, REASON_LEN_MAX, true)?;
    if let Some(t) = &input.ticket {
        check_text("ticket", t, TICKET_LEN_MAX, true)?;
    }
    if input.duration_s == 0 || input.duration_s > DURATION_MAX_S {
        return Err(LifecycleError::Invalid(format!(
            "duration must be between 1s and {}",
            format_duration(DURATION_MAX_S)
        )));
    }
    let Some(ob) = decision.obligations.as_ref().filter(|_| decision.allowed) else {
        return Err(LifecycleError::PolicyDenied(decision.explain()));
    };
    let policy = decision.governing.join(",");
    if input.duration_s > ob.max_duration_s {
        return Err(LifecycleError::DurationExceedsPolicy {
            requested_s: input.duration_s,
            max_s: ob.max_duration_s,
            policy,
        });
    }
    ob.check_ticket(input.ticket.as_deref())
        .map_err(LifecycleError::Ticket)?;
    if let Some(policy) = &ob.require_mfa
        && !requester.authn.mfa
    {
        return Err(LifecycleError::MfaRequired {
            who: requester.name.clone(),
            policy: policy.clone(),
        });
    }

    let mut req = Request {
        id,
        requester: requester.name.clone(),
        target: input.target.clone(),
        role: input.role.clone(),
        reason: input.reason.clone(),
        ticket: input.ticket.clone(),
        emergency: input.emergency,
        state: State::Pending,
        policy,
        approvals_required: ob.approvals,
        approver_groups: ob.approver_groups.iter().cloned().collect(),
        approvals: Vec::new(),
        duration_s: input.duration_s,
        max_duration_s: ob.max_duration_s,
        created_at: now,
        pending_until: now.plus_secs(pending_timeout_s),
        activated_at: None,
        expires_at: None,
        countersign_by: None,
        countersignature: None,
        ended_at: None,
        end_reason: None,
        ended_by: None,
        end_comment: None,
        review_required: input.emergency || ob.review_always.is_some(),
        review: None,
        review_due_at: None,
        review_overdue: false,
        review_findings: Default::default(),
        approver_fresh_auth_s: ob.approver_fresh_auth_s,
        drill: input.drill.clone(),
        version: 1,
    };
    if input.emergency {
        req.countersign_by = ob.countersign_within_s.map(|s| now.plus_secs(s));
    }
    let mut events = vec![event_by(
        requester,
        "request.created",
        &req,
        json!({
            "target": req.target,
            "role": req.role,
            "duration_s": req.duration_s,
            "reason": req.reason,
            "ticket": req.ticket,
            "emergency": req.emergency,
            "policy": req.policy,
            "approvals_required": req.approvals_required,
            "approver_groups": req.approver_groups,
        }),
    )];
    // The label rides in the created event (only when set, so the events of
    // real use keep their encoding) for everything that follows the feed.
    if let (Some(drill), Some(details)) = (&req.drill, events[0].details.as_object_mut()) {
        details.insert("drill".into(), json!(drill));
    }
    if req.approvals_required == 0 {
        activate(&mut req, now, &mut events, requester);
    } else {
        req.countersign_by = None;
    }
    Ok(Transition {
        expected_version: 0,
        request: req,
        events,
    })
}

/// Whether a deadline of this request has passed at `now`.
pub fn is_due(req: &Request, now: Timestamp) -> bool {
    req.deadline().is_some_and(|d| now >= d)
}

/// Applies `cmd` by `actor` to `req` at `now`.
///
/// A request whose deadline has passed accepts only `Tick`: a grant past
/// `expires_at` cannot be approved, countersigned or extended, even if the
/// scheduler has not ended it yet.
pub fn step(
    req: &Request,
    actor: &Actor,
    cmd: &Command,
    now: Timestamp,
) -> Result<Transition, LifecycleError> {
    let mut next = req.clone();
    next.version = req.version + 1;
    let mut events = Vec::new();

    // Approving one's own request is refused as such in every state, before
    // anything else: "wrong state" would suggest that it works at another
    // time.
    if let (Command::Approve { .. }, Actor::Principal(p)) = (cmd, actor)
        && p.name == req.requester
    {
        return Err(LifecycleError::SelfApproval);
    }
    // INVARIANT: a workload never approves, denies, countersigns, reviews
    // or revokes someone else's grant, in any state: approvals are by
    // people.
    if let Actor::Principal(p) = actor
        && p.kind == PrincipalKind::Workload
    {
        let refused = match cmd {
            Command::Approve { .. } => Some("approve or countersign"),
            Command::Deny { .. } => Some("deny"),
            Command::Review { .. } => Some("review"),
            Command::Revoke { .. } if p.name != req.requester => {
                Some("revoke another principal's grant")
            }
            _ => None,
        };
        if let Some(action) = refused {
            return Err(LifecycleError::WorkloadNotAllowed {
                who: p.name.clone(),
                action,
            });
        }
    }
    if req.state.is_final()
        && !matches!(
            cmd,
            Command::Review { .. } | Command::Triage { .. } | Command::ReviewOverdue
        )
    {
        return Err(wrong_state(cmd.name(), req, ""));
    }
    let due = is_due(req, now);
    match (cmd, actor) {
        (Command::Tick, Actor::System) => {
            if !due {
                return Err(LifecycleError::NotDue);
            }
            tick(&mut next, now, &mut events);
        }
        (Command::Offboard, Actor::System) => {
            if due {
                // The deadline decides how it ended: tick first.
                return Err(wrong_state("offboard", req, " but past its deadline"));
            }
            offboard(&mut next, now, &mut events);
        }
        (
            Command::Triage {
                flagged,
                findings,
                evidence,
                due_at,
            },
            Actor::System,
        ) => {
            next.review_findings = findings.clone();
            triage(&mut next, flagged, evidence, *due_at, now, &mut events)?;
        }
        (Command::ReviewOverdue, Actor::System) => {
            let due_at = match (req.review_due_at, &req.review) {
                (Some(d), None) if !req.review_overdue && now >= d => d,
                _ => return Err(LifecycleError::NotDue),
            };
            next.review_overdue = true;
            events.push(event(
                SYSTEM,
                "review.overdue",
                &next,
                json!({"request_id": req.id, "due_at": due_at.to_rfc3339()}),
            ));
        }
        (
            Command::Tick | Command::Offboard | Command::Triage { .. } | Command::ReviewOverdue,
            Actor::Principal(_),
        ) => {
            return Err(LifecycleError::Invalid(format!(
                "{} is for the service only",
                cmd.name()
            )));
        }
        (_, Actor::System) => {
            return Err(LifecycleError::Invalid(format!(
                "{} needs a person",
                cmd.name()
            )));
        }
        (_, Actor::Principal(_)) if due => {
            let detail = match req.state {
                State::Pending => " but past its pending timeout",
                _ => " but past its deadline",
            };
            return Err(wrong_state(cmd.name(), req, detail));
        }
        (Command::Approve { comment }, Actor::Principal(p)) => {
            check_comment(comment.as_deref())?;
            approve(&mut next, p, comment, now, &mut events)?;
        }
        (Command::Deny { reason }, Actor::Principal(p)) => {
            check_text("reason", reason, REASON_LEN_MAX, true)?;
            if req.state != State::Pending {
                return Err(wrong_state("deny", req, ""));
            }
            require_approver(req, p)?;
            require_fresh(req, p, "deny", now)?;
            end(
                &mut next,
                State::Denied,
                EndReason::Denied,
                &p.name,
                Some(reason),
                now,
            );
            events.push(event_by(
                p,
                "request.denied",
                &next,
                json!({"reason": reason}),
            ));
        }
        (Command::Cancel, Actor::Principal(p)) => {
            if req.state != State::Pending {
                return Err(wrong_state("cancel", req, ""));
            }
            if p.name != req.requester {
                return Err(LifecycleError::NotRequester("cancel"));
            }
            end(
                &mut next,
                State::Cancelled,
                EndReason::Cancelled,
                &p.name,
                None,
                now,
            );
            events.push(event_by(p, "request.cancelled", &next, json!({})));
        }
        (Command::Revoke { reason }, Actor::Principal(p)) => {
            check_text("reason", reason, REASON_LEN_MAX, true)?;
            if req.state != State::Active {
                return Err(wrong_state("revoke", req, ""));
            }
            let end_reason = if p.name == req.requester {
                EndReason::Released
            } else if p.admin || req.is_eligible_approver(p) {
                EndReason::Revoked
            } else {
                return Err(LifecycleError::NotAllowedToRevoke {
                    who: p.name.clone(),
                });
            };
            end(
                &mut next,
                State::Revoked,
                end_reason,
                &p.name,
                Some(reason),
                now,
            );
            events.push(event_by(
                p,
                "request.revoked",
                &next,
                json!({"reason": reason, "end_reason": end_reason.as_str()}),
            ));
        }
        (Command::Review { outcome, notes }, Actor::Principal(p)) => {
            check_text("notes", notes, NOTES_LEN_MAX, true)?;
            if !matches!(req.state, State::Expired | State::Revoked) {
                return Err(wrong_state(
                    "review",
                    req,
                    ": only ended grants (expired or revoked) are reviewed",
                ));
            }
            // INVARIANT: `auto_ok` is the service's alone; a person records
            // `ok` or `misuse`, and may do so over an `auto_ok`.
            if *outcome == ReviewOutcome::AutoOk {
                return Err(LifecycleError::Invalid(
                    "auto_ok is recorded by the service only; a person reviews with ok or misuse"
                        .into(),
                ));
            }
            if req
                .review
                .as_ref()
                .is_some_and(|r| r.outcome != ReviewOutcome::AutoOk)
            {
                return Err(LifecycleError::AlreadyReviewed);
            }
            require_approver(req, p)?;
            next.review = Some(Review {
                by: p.name.clone(),
                at: now,
                outcome: *outcome,
                notes: notes.clone(),
            });
            events.push(event_by(
                p,
                "request.reviewed",
                &next,
                json!({"outcome": outcome, "notes": notes}),
            ));
        }
    }
    Ok(Transition {
        expected_version: req.version,
        request: next,
        events,
    })
}

/// Whether an ended request was a grant the automated review looks at:
/// it was active (expired or revoked) and nobody reviewed it yet.
pub fn awaits_triage(req: &Request) -> bool {
    matches!(req.state, State::Expired | State::Revoked)
        && req.activated_at.is_some()
        && req.review.is_none()
        && req.review_due_at.is_none()
}

/// Reasons fixed before any summary: the grant's own kind and policy.
pub fn review_reasons(req: &Request) -> Vec<String> {
    let mut reasons = Vec::new();
    if req.emergency {
        reasons.push("emergency grant".to_string());
    } else if req.review_required {
        reasons.push(format!("policy {} asks for review", req.policy));
    }
    reasons
}

fn triage(
    next: &mut Request,
    flagged: &[String],
    evidence: &serde_json::Value,
    due_at: Timestamp,
    now: Timestamp,
    events: &mut Vec<EventDraft>,
) -> Result<(), LifecycleError> {
    if !matches!(next.state, State::Expired | State::Revoked) || next.activated_at.is_none() {
        return Err(LifecycleError::WrongState {
            action: "triage",
            state: next.state,
            detail: ": only ended grants are reviewed".into(),
        });
    }
    if next.review.is_some() {
        return Err(LifecycleError::AlreadyReviewed);
    }
    if next.review_due_at.is_some() {
        return Err(LifecycleError::WrongState {
            action: "triage",
            state: next.state,
            detail: " and already queued for review".into(),
        });
    }
    let mut reasons = review_reasons(next);
    reasons.extend(flagged.iter().cloned());
    if reasons.is_empty() {
        let notes = "nothing in the summary needed a person".to_string();
        next.review = Some(Review {
            by: SYSTEM.to_string(),
            at: now,
            outcome: ReviewOutcome::AutoOk,
            notes: notes.clone(),
        });
        events.push(event(
            SYSTEM,
            "request.reviewed",
            next,
            json!({"outcome": ReviewOutcome::AutoOk, "notes": notes, "summary": evidence}),
        ));
    } else {
        next.review_required = true;
        next.review_due_at = Some(due_at);
        events.push(event(
            SYSTEM,
            "review.queued",
            next,
            json!({"reasons": reasons, "due_at": due_at.to_rfc3339(), "summary": evidence}),
        ));
    }
    Ok(())
}

fn check_comment(comment: Option<&str>) -> Result<(), LifecycleError> {
    match comment {
        Some(c) => check_text("comment", c, COMMENT_LEN_MAX, false),
        None => Ok(()),
    }
}

fn require_approver(req: &Request, p: &Principal) -> Result<(), LifecycleError> {
    if p.name == req.requester {
        return Err(LifecycleError::SelfApproval);
    }
    if !req.is_eligible_approver(p) {
        return Err(LifecycleError::NotEligible {
            who: p.name.clone(),
            groups: req.approver_groups.join(", "),
        });
    }
    Ok(())
}

/// The governing policy's `@approver_fresh_auth`, if any, holds for `p`.
fn require_fresh(
    req: &Request,
    p: &Principal,
    action: &'static str,
    now: Timestamp,
) -> Result<(), LifecycleError> {
    match req.approver_fresh_auth_s {
        Some(window_s) if !p.authn.is_fresh(window_s, now) => Err(LifecycleError::StepUpRequired {
            who: p.name.clone(),
            action,
            window_s,
        }),
        _ => Ok(()),
    }
}

fn approve(
    next: &mut Request,
    p: &Principal,
    comment: &Option<String>,
    now: Timestamp,
    events: &mut Vec<EventDraft>,
) -> Result<(), LifecycleError> {
    let approval = Approval {
        by: p.name.clone(),
        at: now,
        comment: comment.clone(),
    };
    match next.state {
        State::Pending => {
            require_approver(next, p)?;
            require_fresh(next, p, "approve", now)?;
            // INVARIANT: approvals holds distinct people; a second approval by
            // the same person is refused, never counted.
            if next.approvals.iter().any(|a| a.by == p.name) {
                return Err(LifecycleError::AlreadyApproved(p.name.clone()));
            }
            next.approvals.push(approval);
            events.push(event_by(
                p,
                "request.approved",
                next,
                json!({
                    "comment": comment,
                    "approvals": next.approvals.len(),
                    "approvals_required": next.approvals_required,
                }),
            ));
            if next.approvals.len() as u32 >= next.approvals_required {
                activate(next, now, events, p);
            }
            Ok(())
        }
        State::Active if next.countersign_by.is_some() && next.countersignature.is_none() => {
            require_approver(next, p)?;
            require_fresh(next, p, "countersign", now)?;
            next.countersignature = Some(approval);
            events.push(event_by(
                p,
                "request.countersigned",
                next,
                json!({"comment": comment}),
            ));
            Ok(())
        }
        State::Active => {
            let detail = if next.countersignature.is_some() {
                " and already countersigned"
            } else {
                " and needs no countersignature"
            };
            Err(wrong_state("approve", next, detail))
        }
        _ => Err(wrong_state("approve", next, "")),
    }
}

fn end(
    next: &mut Request,
    state: State,
    reason: EndReason,
    by: &str,
    comment: Option<&String>,
    now: Timestamp,
) {
    next.state = state;
    next.end_reason = Some(reason);
    next.ended_by = Some(by.to_string());
    next.end_comment = comment.cloned();
    next.ended_at = Some(now);
}

fn offboard(next: &mut Request, now: Timestamp, events: &mut Vec<EventDraft>) {
    let reason = EndReason::PrincipalRemoved;
    let details = json!({"end_reason": reason.as_str(), "requester": next.requester});
    match next.state {
        State::Pending => {
            end(next, State::Cancelled, reason, "system", None, now);
            events.push(event("system", "request.cancelled", next, details));
        }
        State::Active => {
            end(next, State::Revoked, reason, "system", None, now);
            events.push(event("system", "request.revoked", next, details));
        }
        _ => {}
    }
}

fn tick(next: &mut Request, now: Timestamp, events: &mut Vec<EventDraft>) {
    match next.state {
        State::Pending => {
            end(
                next,
                State::TimedOut,
                EndReason::TimedOut,
                "system",
                None,
                now,
            );
            let details = json!({"pending_until": next.pending_until.to_rfc3339()});
            events.push(event("system", "request.timed_out", next, details));
        }
        State::Active => {
            let expires = next.expires_at.unwrap_or(now);
            let countersign_missed = match (next.countersign_by, &next.countersignature) {
                (Some(by), None) => by <= expires && now >= by,
                _ => false,
            };
            if countersign_missed {
                end(
                    next,
                    State::Revoked,
                    EndReason::NotCountersigned,
                    "system",
                    None,
                    now,
                );
                let details = json!({
                    "end_reason": "not_countersigned",
                    "countersign_by": next.countersign_by.map(|t| t.to_rfc3339()),
                    "lateness_ms": now.millis() - next.countersign_by.map_or(now.millis(), |t| t.millis()),
                });
                events.push(event("system", "request.revoked", next, details));
            } else {
                end(
                    next,
                    State::Expired,
                    EndReason::Expired,
                    "system",
                    None,
                    now,
                );
                let details = json!({
                    "expires_at": expires.to_rfc3339(),
                    "lateness_ms": now.millis() - expires.millis(),
                });
                events.push(event("system", "request.expired", next, details));
            }
        }
        _ => {}
    }
}

/// Limits on the emergency path that hold whatever the policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmergencyLimits {
    /// Emergency requests (pending or live) one principal may hold at once.
    pub active_per_principal_max: u32,
    /// An ended emergency grant must be reviewed within this long; while its
    /// review is overdue its requester gets no new emergency access.
    pub review_within_s: u64,
}

/// Decides whether `requester` may open a new emergency request at `now`,
/// given their other emergency requests that are open, or ended and not yet
/// reviewed (`others`; requests of other principals and non-emergency ones
/// are ignored). The refusal names the request that blocks and what to do.
///
/// A new emergency request is refused while the requester has:
/// - a live emergency grant still waiting for its countersignature;
/// - an ended emergency grant that was never countersigned although its
///   policy asked for it, until it is reviewed (otherwise a grant that is
///   cut for want of a countersignature could be re-opened at once, again
///   and again);
/// - an ended emergency grant whose review is overdue;
/// - `active_per_principal_max` open (pending or live) emergency requests.
pub fn check_emergency(
    requester: &str,
    others: &[Request],
    limits: &EmergencyLimits,
    now: Timestamp,
) -> Result<(), LifecycleError> {
    let mut mine: Vec<&Request> = others
        .iter()
        .filter(|r| r.emergency && r.requester == requester)
        .collect();
    mine.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let blocked = |r: &Request, reason: String| LifecycleError::EmergencyBlocked {
        blocking: r.id.clone(),
        reason,
    };
    let groups = |r: &Request| r.approver_groups.join(", ");
    let awaiting_countersign =
        |r: &Request| r.countersign_by.is_some() && r.countersignature.is_none();
    let mut open: Vec<&Request> = Vec::new();
    for &r in &mine {
        if r.state == State::Pending || r.is_live(now) {
            if r.state == State::Active && awaiting_countersign(r) {
                return Err(blocked(
                    r,
                    format!(
                        "emergency grant {} is not countersigned yet: an approver from {} must countersign it (breakglass approve {}), or release it (breakglass revoke {}) first",
                        r.id,
                        groups(r),
                        r.id,
                        r.id
                    ),
                ));
            }
            open.push(r);
            continue;
        }
        let ended = r.activated_at.is_some()
            && matches!(r.state, State::Active | State::Expired | State::Revoked);
        if !ended || !r.review_required || r.review.is_some() {
            continue;
        }
        if awaiting_countersign(r) {
            return Err(blocked(
                r,
                format!(
                    "emergency grant {} ended without the countersignature its policy asks for and is not reviewed yet: an approver from {} must review it (breakglass review {}) first",
                    r.id,
                    groups(r),
                    r.id
                ),
            ));
        }
        let ended_at = r.ends_at().unwrap_or(now);
        let due = ended_at.plus_secs(limits.review_within_s);
        if now >= due {
            return Err(blocked(
                r,
                format!(
                    "the review of emergency grant {} is overdue since {} (emergency grants are reviewed within {} of their end): an approver from {} must review it (breakglass review {}) first",
                    r.id,
                    due.to_rfc3339(),
                    format_duration(limits.review_within_s),
                    groups(r),
                    r.id
                ),
            ));
        }
    }
    if let Some(first) = open.first()
        && open.len() as u64 >= u64::from(limits.active_per_principal_max)
    {
        let what = if first.state == State::Pending {
            format!("cancel it (breakglass cancel {})", first.id)
        } else {
            format!("release it (breakglass revoke {})", first.id)
        };
        return Err(blocked(
            first,
            format!(
                "{} already has {} open emergency request(s) (the oldest is {}), the most one principal may hold at once is {}: {what} or wait until it ends",
                requester,
                open.len(),
                first.id,
                limits.active_per_principal_max
            ),
        ));
    }
    Ok(())
}
