//! What a notification says, independent of where it goes: [`Notice`] is
//! built from one audit event (and the request it is about), and rendered
//! for each kind of sink. Pure: no IO, no clock.

use breakglass_core::audit::AuditEvent;
use breakglass_core::time::format_duration;
use breakglass_core::{Request, State, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

/// The longest reason, comment or error text quoted in a message; longer
/// ones are cut (the audit log keeps them whole).
pub const QUOTE_LEN_MAX: usize = 600;
/// A header line of a Slack message is at most this long (Slack's limit is
/// 150 characters).
pub const HEADLINE_LEN_MAX: usize = 150;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Urgency {
    Normal,
    /// An emergency activation, a countersignature deadline approaching, a
    /// late review, a failed drill: said louder.
    High,
}

/// Who a notice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    /// The request's eligible approvers (the payload lists them).
    Approvers,
    /// The requester.
    Requester,
    /// Whoever watches the service (security sinks, SIEM).
    Operators,
}

/// The request as a notification shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestView {
    pub id: String,
    pub requester: String,
    pub target: String,
    pub role: String,
    pub reason: String,
    pub ticket: Option<String>,
    pub emergency: bool,
    pub state: State,
    pub duration_s: u64,
    pub approvals_required: u32,
    pub approvals: u32,
    pub approvals_missing: u32,
    pub approver_groups: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub countersign_by: Option<Timestamp>,
    pub countersigned: bool,
    /// The drill that made this request, if a drill did.
    pub drill: Option<String>,
}

impl RequestView {
    /// `drill`: the label of a request made by a drill (read in one place
    /// by the server).
    pub fn new(r: &Request, drill: Option<String>) -> RequestView {
        let approvals = r.approvals.len() as u32;
        RequestView {
            id: r.id.clone(),
            requester: r.requester.clone(),
            target: r.target.clone(),
            role: r.role.clone(),
            reason: r.reason.clone(),
            ticket: r.ticket.clone(),
            emergency: r.emergency,
            state: r.state,
            duration_s: r.duration_s,
            approvals_required: r.approvals_required,
            approvals,
            approvals_missing: r.approvals_required.saturating_sub(approvals),
            approver_groups: r.approver_groups.clone(),
            expires_at: r.expires_at,
            countersign_by: r.countersign_by,
            countersigned: r.countersignature.is_some(),
            drill,
        }
    }
}

/// One notification, before rendering.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    /// The audit event's `seq`: the `webhook-id`, stable across redeliveries.
    pub seq: u64,
    pub time: Timestamp,
    /// The audit action (`request.created`, `review.overdue`, ...).
    #[serde(rename = "type")]
    pub action: String,
    pub actor: String,
    pub urgency: Urgency,
    pub audience: Audience,
    /// One line that reads well on a phone's lock screen.
    pub summary: String,
    pub request: Option<RequestView>,
    /// Everyone eligible to approve, so a receiver can route the message.
    pub approvers: Vec<String>,
    /// The console page of the request, when `server.public_url` is set.
    pub link: Option<String>,
    /// The CLI command that acts on it (when there is no console link, the
    /// message shows this instead).
    pub command: Option<String>,
    /// The audit event's details (the audit log never holds secrets).
    pub details: Value,
}

/// Where links point: the console's base URL, if any.
#[derive(Debug, Clone, Default)]
pub struct Links {
    pub public_url: Option<String>,
}

impl Links {
    pub fn request(&self, id: &str) -> Option<String> {
        self.public_url
            .as_ref()
            .map(|base| format!("{}/requests/{id}", base.trim_end_matches('/')))
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn detail_str<'a>(details: &'a Value, key: &str) -> Option<&'a str> {
    details.get(key).and_then(Value::as_str)
}

/// Builds the notice for `event`; `None` when the event tells nobody
/// anything (a `request.created` that activates at once is followed by its
/// `request.activated`, which does).
pub fn build(
    event: &AuditEvent,
    request: Option<RequestView>,
    approvers: Vec<String>,
    links: &Links,
) -> Option<Notice> {
    let details: Value = serde_json::from_str(&event.details).unwrap_or(Value::Null);
    let (urgency, audience, summary) =
        describe(&event.action, &event.actor, &details, request.as_ref())?;
    let id = request.as_ref().map(|r| r.id.clone());
    let command = id.as_ref().map(|id| {
        let verb = match event.action.as_str() {
            "request.created" | "request.countersign_due" => "approve",
            "review.overdue" => "review",
            "request.activated" if request.as_ref().is_some_and(|r| r.emergency) => "approve",
            _ => "show",
        };
        match verb {
            "review" => format!("breakglass review {id} --outcome ok|misuse --notes TEXT"),
            v => format!("breakglass {v} {id}"),
        }
    });
    Some(Notice {
        seq: event.seq,
        time: event.time,
        action: event.action.clone(),
        actor: event.actor.clone(),
        urgency,
        audience,
        summary,
        link: id.as_deref().and_then(|id| links.request(id)),
        command,
        request,
        approvers,
        details,
    })
}

fn missing(r: &RequestView) -> String {
    match r.approvals_missing {
        0 => "no approval missing".into(),
        1 => "1 approval missing".into(),
        n => format!("{n} approvals missing"),
    }
}

fn describe(
    action: &str,
    actor: &str,
    details: &Value,
    r: Option<&RequestView>,
) -> Option<(Urgency, Audience, String)> {
    use Audience::*;
    use Urgency::*;
    let what = |r: &RequestView| {
        format!(
            "{} on {} for {}",
            r.role,
            r.target,
            format_duration(r.duration_s)
        )
    };
    let drill = |r: &RequestView| match &r.drill {
        Some(d) => format!("[drill {d}] "),
        None => String::new(),
    };
    let out = match (action, r) {
        ("request.created", Some(r)) => {
            let required = details
                .get("approvals_required")
                .and_then(Value::as_u64)
                .unwrap_or(u64::from(r.approvals_required));
            if required == 0 {
                return None;
            }
            (
                Normal,
                Approvers,
                format!(
                    "{}{} asks for {}: {} ({})",
                    drill(r),
                    r.requester,
                    what(r),
                    cut(&r.reason, 120),
                    missing(r)
                ),
            )
        }
        ("request.activated", Some(r)) if r.emergency => {
            let by = detail_str(details, "countersign_by")
                .map(|t| format!("; countersign by {t} or it is revoked"))
                .unwrap_or_default();
            (
                High,
                Approvers,
                format!(
                    "{}EMERGENCY: {} activated {}: {}{by}",
                    drill(r),
                    r.requester,
                    what(r),
                    cut(&r.reason, 120)
                ),
            )
        }
        ("request.activated", Some(r)) => (
            Normal,
            Requester,
            format!(
                "{}approved: {}'s {} is active until {}",
                drill(r),
                r.requester,
                what(r),
                detail_str(details, "expires_at").unwrap_or("its expiry")
            ),
        ),
        ("request.denied", Some(r)) => (
            Normal,
            Requester,
            format!(
                "{}denied by {actor}: {}'s request for {}: {}",
                drill(r),
                r.requester,
                what(r),
                cut(detail_str(details, "reason").unwrap_or(""), 200)
            ),
        ),
        ("request.timed_out", Some(r)) => (
            Normal,
            Requester,
            format!(
                "{}timed out: nobody decided {}'s request for {}",
                drill(r),
                r.requester,
                what(r)
            ),
        ),
        ("request.revoked", Some(r)) => (
            Normal,
            Requester,
            format!(
                "{}revoked by {actor}: {}'s {}",
                drill(r),
                r.requester,
                what(r)
            ),
        ),
        ("request.countersign_due", Some(r)) => (
            High,
            Approvers,
            format!(
                "{}COUNTERSIGN NEEDED by {}: {}'s emergency {} is revoked without it",
                drill(r),
                detail_str(details, "countersign_by").unwrap_or("its deadline"),
                r.requester,
                what(r)
            ),
        ),
        ("request.countersigned", Some(r)) => (
            Normal,
            Requester,
            format!(
                "{}countersigned by {actor}: {}'s emergency {}",
                drill(r),
                r.requester,
                what(r)
            ),
        ),
        ("request.reviewed", Some(r)) => (
            Normal,
            Operators,
            format!(
                "{}reviewed by {actor} ({}): {}'s emergency {}",
                drill(r),
                detail_str(details, "outcome").unwrap_or("done"),
                r.requester,
                what(r)
            ),
        ),
        ("review.overdue", Some(r)) => (
            High,
            Approvers,
            format!(
                "{}REVIEW OVERDUE since {}: {}'s emergency {}",
                drill(r),
                detail_str(details, "due_at").unwrap_or("its deadline"),
                r.requester,
                what(r)
            ),
        ),
        ("drill.completed", _) => {
            let name = detail_str(details, "drill").unwrap_or("?");
            if detail_str(details, "result") == Some("pass") {
                (Normal, Operators, format!("drill {name} passed"))
            } else {
                (
                    High,
                    Operators,
                    format!(
                        "DRILL FAILED: {name} at step {}: {}",
                        detail_str(details, "failed_step").unwrap_or("?"),
                        cut(detail_str(details, "error").unwrap_or(""), 200)
                    ),
                )
            }
        }
        ("notify.failed", _) => (
            Normal,
            Operators,
            format!(
                "notification sink {} gave up on event {} ({})",
                detail_str(details, "sink").unwrap_or("?"),
                details.get("seq").and_then(Value::as_u64).unwrap_or(0),
                cut(detail_str(details, "error").unwrap_or(""), 200)
            ),
        ),
        ("notify.test", _) => (
            Normal,
            Operators,
            format!("test notification from breakglass, sent by {actor}"),
        ),
        (action, _) => (Normal, Operators, format!("{action} by {actor}")),
    };
    Some((out.0, out.1, cut(&out.2, 400)))
}

/// The body of a webhook: the notice as JSON.
pub fn webhook_body(n: &Notice) -> Vec<u8> {
    serde_json::to_vec(n).unwrap_or_default()
}

/// Slack's mrkdwn wants `&`, `<` and `>` escaped; nothing a requester
/// typed may turn into a link or a mention.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The value of an Approve or Deny button: the request id.
pub const SLACK_ACTION_APPROVE: &str = "breakglass_approve";
pub const SLACK_ACTION_DENY: &str = "breakglass_deny";

/// An incoming-webhook Block Kit message. With `interactive`, a pending
/// request gets Approve and Deny buttons.
pub fn slack_message(n: &Notice, interactive: bool) -> Value {
    let icon = match n.urgency {
        Urgency::High => ":rotating_light: ",
        Urgency::Normal => "",
    };
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": cut(&format!("{icon}{}", headline(n)), HEADLINE_LEN_MAX)},
    })];
    if let Some(r) = &n.request {
        let mut fields = vec![
            json!({"type": "mrkdwn", "text": format!("*Who*\n{}", esc(&r.requester))}),
            json!({"type": "mrkdwn", "text": format!("*What*\n{} on {}", esc(&r.role), esc(&r.target))}),
            json!({"type": "mrkdwn", "text": format!("*How long*\n{}", format_duration(r.duration_s))}),
            json!({"type": "mrkdwn", "text": format!("*Approvals*\n{} of {} ({})", r.approvals, r.approvals_required, missing(r))}),
        ];
        if let Some(t) = &r.ticket {
            fields.push(json!({"type": "mrkdwn", "text": format!("*Ticket*\n{}", esc(t))}));
        }
        if let Some(d) = &r.drill {
            fields.push(json!({"type": "mrkdwn", "text": format!("*Drill*\n{}", esc(d))}));
        }
        blocks.push(json!({"type": "section", "fields": fields}));
        blocks.push(json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": format!("*Why*\n{}", esc(&cut(&r.reason, QUOTE_LEN_MAX)))},
        }));
    } else {
        blocks.push(json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": esc(&n.summary)},
        }));
    }
    let pointer = match (&n.link, &n.command) {
        (Some(link), _) => format!("<{}|Open in the console>", esc(link)),
        (None, Some(cmd)) => format!("`{}`", esc(cmd)),
        (None, None) => String::new(),
    };
    if !pointer.is_empty() {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": pointer}]}));
    }
    let actionable = n.request.as_ref().is_some_and(|r| {
        (n.action == "request.created" && r.state == State::Pending)
            || (matches!(
                n.action.as_str(),
                "request.activated" | "request.countersign_due"
            ) && r.emergency
                && r.countersign_by.is_some()
                && !r.countersigned
                && r.state == State::Active)
    });
    if interactive
        && actionable
        && let Some(r) = &n.request
    {
        let approve = if r.state == State::Active {
            "Countersign"
        } else {
            "Approve"
        };
        let mut elements = vec![json!({
            "type": "button", "action_id": SLACK_ACTION_APPROVE, "style": "primary",
            "text": {"type": "plain_text", "text": approve}, "value": r.id,
        })];
        if r.state == State::Pending {
            elements.push(json!({
                "type": "button", "action_id": SLACK_ACTION_DENY, "style": "danger",
                "text": {"type": "plain_text", "text": "Deny"}, "value": r.id,
            }));
        }
        blocks.push(json!({"type": "actions", "block_id": format!("breakglass:{}", r.id), "elements": elements}));
    }
    json!({"text": format!("{icon}{}", n.summary), "blocks": blocks})
}

fn headline(n: &Notice) -> String {
    match (&n.request, n.action.as_str()) {
        (Some(r), "request.created") => {
            format!("{} asks for {} on {}", r.requester, r.role, r.target)
        }
        _ => n.summary.clone(),
    }
}

/// A message that replaces an interactive one after someone acted on it:
/// the original facts, the outcome, no buttons.
pub fn slack_outcome(r: &RequestView, outcome: &str, links: &Links) -> Value {
    let n = Notice {
        seq: 0,
        time: Timestamp(0),
        action: "slack.outcome".into(),
        actor: String::new(),
        urgency: Urgency::Normal,
        audience: Audience::Approvers,
        summary: format!("{} on {} for {}: {outcome}", r.role, r.target, r.requester),
        request: Some(r.clone()),
        approvers: Vec::new(),
        link: links.request(&r.id),
        command: Some(format!("breakglass show {}", r.id)),
        details: Value::Null,
    };
    let mut msg = slack_message(&n, false);
    if let Some(blocks) = msg.get_mut("blocks").and_then(Value::as_array_mut) {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": esc(outcome)}}));
    }
    msg["replace_original"] = json!(true);
    msg
}

/// The PagerDuty Events API v2 event for a notice, if it is one PagerDuty
/// cares about: an emergency activation (and its louder reminders) triggers
/// an incident keyed by the request id; a countersignature or review
/// resolves it. A failed drill triggers one keyed by the drill.
pub fn pagerduty_event(n: &Notice, routing_key: &str) -> Option<Value> {
    let (action, dedup_key) = match (n.action.as_str(), &n.request) {
        ("request.activated", Some(r)) if r.emergency => ("trigger", r.id.clone()),
        ("request.countersign_due" | "review.overdue", Some(r)) => ("trigger", r.id.clone()),
        ("request.countersigned" | "request.reviewed", Some(r)) => ("resolve", r.id.clone()),
        ("drill.completed", _) => {
            let name = detail_str(&n.details, "drill").unwrap_or("drill");
            let act = if n.urgency == Urgency::High {
                "trigger"
            } else {
                "resolve"
            };
            (act, format!("drill:{name}"))
        }
        ("notify.test", _) => ("trigger", format!("breakglass-test-{}", n.seq)),
        _ => return None,
    };
    let mut ev = json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key,
    });
    if action == "trigger" {
        ev["payload"] = json!({
            "summary": cut(&n.summary, 1024),
            "source": "breakglass",
            "severity": if n.urgency == Urgency::High { "critical" } else { "warning" },
            "timestamp": n.time.to_rfc3339(),
            "component": n.request.as_ref().map(|r| r.target.clone()),
            "custom_details": {
                "request": n.request,
                "approvers": n.approvers,
                "type": n.action,
                "seq": n.seq,
            },
        });
        if let Some(link) = &n.link {
            ev["links"] = json!([{"href": link, "text": "breakglass console"}]);
        }
    }
    Some(ev)
}
