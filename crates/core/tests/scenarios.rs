//! Lifecycle scenarios as data (DESIGN §2 and §3).
//!
//! Every test is a short script run against one fixed Cedar policy set and
//! one fixed set of principals. The interpreter drives the real
//! `PolicyEngine`, `lifecycle::create` and `lifecycle::step`, applies each
//! `Transition` the way a store would (compare-and-set on the version) and
//! prints a transcript: the events and the resulting state, or the refusal.
//! The transcript is an `expect!` snapshot; refresh them with
//! `UPDATE_EXPECT=1 cargo test -p breakglass-core`.
//!
//! Script lines (times are relative to a fixed epoch, e.g. `@15m4s999ms`):
//!
//! ```text
//! request WHO TARGET ROLE DURATION ["reason"] [ticket=T] @T
//! emergency WHO TARGET ROLE DURATION ["reason"] [ticket=T] @T
//! approve WHO ["comment"] @T      deny WHO "reason" @T
//! cancel WHO @T                   revoke WHO "reason" @T
//! review WHO ok|misuse "notes" @T
//! tick [WHO] @T                   live @T
//! offboard @T                     switch ID @T
//! limits MAX_OPEN REVIEW_WITHIN @T
//! ```
//!
//! `emergency` also applies the emergency limits against every earlier
//! request of the script (default: one open at a time, review within 24h).
//! Commands act on the newest request; `switch r1` acts on `r1` instead.
//!
//! `WHO` may be `system`. The file ends with two authorization matrices,
//! judged by rules written here independently of the core: every principal
//! and command against every reachable state (compared with `step`), and
//! every principal, target, role, action and duration (compared with
//! `evaluate` + `create`).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use breakglass_core::audit::canonical_json;
use breakglass_core::lifecycle::{self, Command, EmergencyLimits, NewRequest, Transition};
use breakglass_core::policy::{Action, PolicyEngine, PolicyInput};
use breakglass_core::time::parse_duration;
use breakglass_core::{
    Actor, AuthMethod, EndReason, Principal, PrincipalKind, Request, ReviewOutcome, State,
    Timestamp,
};
use expect_test::{Expect, expect};

/// Every script starts here: 2027-01-15T08:00:00Z, a Friday.
const EPOCH_MS: i64 = 1_800_000_000_000;
const PENDING_TIMEOUT_S: u64 = 30 * 60;
const MINUTE_MS: i64 = 60_000;

/// Modelled on DESIGN §3, plus a few policies that make the combination
/// rules observable: `pay-db` is in both `production` and `payments`, so two
/// permits match every request for it.
const POLICY: &str = r#"
@id("oncall-db-read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "read" };

@id("oncall-db-admin")
@approvals("2")
@approvers("sre-leads,security")
@max_duration("15m")
@require_ticket("^INC-[0-9]+$")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "admin" };

@id("ic-emergency")
@approvals("0")
@approvers("sre-leads")
@countersign_within("5m")
@max_duration("10m")
permit (principal in Group::"incident-commanders", action == Action::"emergency",
        resource in TargetGroup::"production");

@id("oncall-emergency-read")
@approvals("0")
@approvers("sre-leads")
@countersign_within("2m")
@max_duration("10m")
permit (principal in Group::"oncall", action == Action::"emergency",
        resource in TargetGroup::"production")
when { context.role == "read" };

@id("payments")
@approvals("2")
@approvers("payments-leads")
@max_duration("20m")
@require_ticket("^[A-Z]+-[0-9]{4,}$")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"payments");

@id("batch-window")
@approvals("1")
@approvers("sre-leads")
@max_duration("4h")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "batch" };

@id("drill")
@approvals("0")
@max_duration("5m")
permit (principal in Group::"drillers", action == Action::"request",
        resource == Target::"canary-db");

@id("no-long-grants")
forbid (principal, action, resource) when { context.duration_s > 3600 };
"#;

/// name, groups, admin (member of the service's `admin_groups`).
const PRINCIPALS: &[(&str, &[&str], bool)] = &[
    ("alice", &["oncall"], false),
    ("bob", &["sre-leads"], false),
    ("carol", &["sre-leads", "security"], false),
    ("dave", &["security"], false),
    ("erin", &["incident-commanders", "oncall"], false),
    // Requester and eligible approver at once: self-approval must still fail.
    ("frank", &["oncall", "sre-leads"], false),
    ("paula", &["payments-leads"], false),
    ("drill-bot", &["drillers"], false),
    ("mallory", &[], false),
    ("root", &["security"], true),
];

const TARGETS: &[(&str, &[&str])] = &[
    ("prod-db", &["production"]),
    ("pay-db", &["production", "payments"]),
    ("canary-db", &["canaries"]),
    ("staging-db", &["staging"]),
];

fn principal(name: &str) -> Principal {
    let (name, groups, admin) = PRINCIPALS
        .iter()
        .find(|(n, _, _)| *n == name)
        .unwrap_or_else(|| panic!("script names unknown principal {name:?}"));
    Principal::local(
        name.to_string(),
        groups.iter().map(|g| g.to_string()).collect(),
        *admin,
    )
}

/// A workload (a CI job's token) in every approver group of the policy: it
/// still may never approve, deny, countersign, review or revoke another's
/// grant.
fn workload_actor() -> Actor {
    let mut p = Principal::local(
        "gha:acme/payments:production",
        ["sre-leads", "security", "payments-leads", "oncall"]
            .iter()
            .map(|g| g.to_string())
            .collect(),
        false,
    );
    p.kind = PrincipalKind::Workload;
    p.authn.method = AuthMethod::Workload;
    Actor::Principal(p)
}

fn actor(name: &str) -> Actor {
    match name {
        "system" => Actor::System,
        _ => Actor::Principal(principal(name)),
    }
}

fn at(rel_ms: i64) -> Timestamp {
    Timestamp(EPOCH_MS + rel_ms)
}

/// `@15m4s999ms` style, relative to the epoch.
fn rel(t: Timestamp) -> String {
    let ms = t.millis() - EPOCH_MS;
    let mut out = String::from(if ms < 0 { "@-" } else { "@" });
    let ms = ms.unsigned_abs();
    if ms == 0 {
        out.push_str("0s");
    }
    let parts = [
        (ms / 3_600_000, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    for (n, unit) in parts {
        if n > 0 {
            let _ = write!(out, "{n}{unit}");
        }
    }
    out
}

fn parse_at(token: &str) -> i64 {
    let body = token.strip_prefix('@').expect("time starts with @");
    let mut total = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (n, after) = rest.split_at(digits);
        let letters = after.len()
            - after
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, after) = after.split_at(letters);
        let n: i64 = n.parse().unwrap_or_else(|_| panic!("bad time {token:?}"));
        total += n * match unit {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1000,
            "ms" => 1,
            _ => panic!("bad time unit in {token:?}"),
        };
        rest = after;
    }
    total
}

/// One script line, split shell-style: bare words, quoted strings, the
/// `ticket=` option and the `@time`.
struct Line {
    words: Vec<String>,
    quoted: Vec<String>,
    ticket: Option<String>,
    now: Timestamp,
}

impl Line {
    fn parse(text: &str) -> Line {
        let mut words = Vec::new();
        let mut quoted = Vec::new();
        let mut ticket = None;
        let mut now = None;
        let mut chars = text.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if c == '"' {
                chars.next();
                let s: String = chars.by_ref().take_while(|&c| c != '"').collect();
                quoted.push(s);
            } else {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    w.push(c);
                    chars.next();
                }
                if let Some(t) = w.strip_prefix("ticket=") {
                    ticket = Some(t.to_string());
                } else if w.starts_with('@') {
                    now = Some(at(parse_at(&w)));
                } else {
                    words.push(w);
                }
            }
        }
        Line {
            words,
            quoted,
            ticket,
            now: now.unwrap_or_else(|| panic!("line without @time: {text:?}")),
        }
    }

    fn word(&self, i: usize) -> &str {
        self.words
            .get(i)
            .unwrap_or_else(|| panic!("missing argument {i} in {:?}", self.words))
    }

    fn text(&self, i: usize) -> String {
        self.quoted
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("missing quoted argument {i}"))
    }
}

/// The script interpreter: one policy engine and the request the script is
/// about (a later successful `request` replaces it).
struct World {
    engine: PolicyEngine,
    request: Option<Request>,
    created: u32,
    /// Every request of the script as it is now, by id.
    history: std::collections::BTreeMap<String, Request>,
    limits: EmergencyLimits,
}

impl World {
    fn new() -> World {
        World {
            engine: PolicyEngine::load(POLICY, "scenarios.cedar").expect("scenario policy loads"),
            request: None,
            created: 0,
            history: Default::default(),
            limits: EmergencyLimits {
                active_per_principal_max: 1,
                review_within_s: 24 * 3600,
            },
        }
    }

    fn current(&self) -> &Request {
        self.request
            .as_ref()
            .expect("script acts before any request exists")
    }

    /// Runs one line; `Ok` is the transcript of a transition, `Err` a refusal.
    fn run(&mut self, line: &Line) -> Result<String, String> {
        let verb = line.word(0);
        let now = line.now;
        let cmd = match verb {
            "request" | "emergency" => return self.create(line, verb == "emergency"),
            "live" => {
                let live = self.current().is_live(now);
                return Ok(format!("  live: {}\n", if live { "yes" } else { "no" }));
            }
            "switch" => {
                let id = line.word(1);
                self.request = Some(
                    self.history
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| panic!("no request {id}")),
                );
                return Ok(format!("  => {}\n", describe(self.current())));
            }
            "limits" => {
                self.limits = EmergencyLimits {
                    active_per_principal_max: line.word(1).parse().expect("limit is a number"),
                    review_within_s: parse_duration(line.word(2)).expect("review window"),
                };
                return Ok(String::new());
            }
            "offboard" => Command::Offboard,
            "approve" => Command::Approve {
                comment: line.quoted.first().cloned(),
            },
            "deny" => Command::Deny {
                reason: line.text(0),
            },
            "cancel" => Command::Cancel,
            "revoke" => Command::Revoke {
                reason: line.text(0),
            },
            "review" => Command::Review {
                outcome: ReviewOutcome::parse(line.word(2))
                    .expect("review outcome is ok or misuse"),
                notes: line.text(0),
            },
            "tick" => Command::Tick,
            _ => panic!("unknown verb {verb:?}"),
        };
        let who = match verb {
            "tick" => actor(line.words.get(1).map_or("system", String::as_str)),
            "offboard" => Actor::System,
            _ => actor(line.word(1)),
        };
        let req = self.current().clone();
        let t = lifecycle::step(&req, &who, &cmd, now).map_err(|e| e.to_string())?;
        Ok(self.apply(t))
    }

    fn create(&mut self, line: &Line, emergency: bool) -> Result<String, String> {
        let who = principal(line.word(1));
        let target = line.word(2);
        let role = line.word(3);
        // Plain seconds (`0s`, `604801s`) bypass the parser's own limits so
        // the lifecycle's checks show.
        let text = line.word(4);
        let duration_s = match text.strip_suffix('s').map(str::parse::<u64>) {
            Some(Ok(s)) => s,
            _ => parse_duration(text).expect("script duration parses"),
        };
        let reason = line
            .quoted
            .first()
            .cloned()
            .unwrap_or_else(|| "incident".into());
        let groups: Vec<String> = who.groups.iter().cloned().collect();
        let target_groups: Vec<String> = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, g)| g.iter().map(|g| g.to_string()).collect())
            .unwrap_or_default();
        let input = PolicyInput {
            principal: &who.name,
            principal_groups: &groups,
            kind: who.kind,
            authn: &who.authn,
            target,
            target_groups: &target_groups,
            action: if emergency {
                Action::Emergency
            } else {
                Action::Request
            },
            role,
            duration_s,
            reason: &reason,
            ticket: line.ticket.as_deref(),
            now: line.now,
        };
        let decision = self.engine.evaluate(&input);
        let new = NewRequest {
            target: target.to_string(),
            role: role.to_string(),
            duration_s,
            reason,
            ticket: line.ticket.clone(),
            emergency,
            drill: None,
        };
        let id = format!("r{}", self.created + 1);
        let t = lifecycle::create(&new, &who, &decision, id, line.now, PENDING_TIMEOUT_S)
            .map_err(|e| e.to_string())?;
        if emergency {
            let others: Vec<Request> = self.history.values().cloned().collect();
            lifecycle::check_emergency(&who.name, &others, &self.limits, line.now)
                .map_err(|e| e.to_string())?;
        }
        self.created += 1;
        // A new request starts a new compare-and-set history.
        self.request = None;
        Ok(self.apply(t))
    }

    /// Applies a transition as a store would, checking the invariants that
    /// hold after every step, and describes it.
    fn apply(&mut self, t: Transition) -> String {
        let before = self.request.take();
        let expected = before.as_ref().map_or(0, |r| r.version);
        assert_eq!(t.expected_version, expected, "compare-and-set version");
        assert_eq!(t.request.version, expected + 1, "version is bumped");
        assert!(!t.events.is_empty(), "every transition has an audit event");
        let new = t.request;
        for e in &t.events {
            assert_eq!(e.request_id.as_deref(), Some(new.id.as_str()));
        }
        check_invariants(before.as_ref(), &new);
        let mut out = String::new();
        for e in &t.events {
            let _ = writeln!(out, "  {} by {}:{}", e.action, e.actor, details(&e.details));
        }
        let _ = writeln!(out, "  => {}", describe(&new));
        self.history.insert(new.id.clone(), new.clone());
        self.request = Some(new);
        out
    }
}

/// DESIGN §2 rules that must hold after every successful step, whatever the
/// script did.
fn check_invariants(before: Option<&Request>, new: &Request) {
    if let Some(old) = before {
        assert_eq!(old.id, new.id);
        if old.state.is_final() {
            // Only a review may be added to an ended request.
            assert_eq!(old.state, new.state, "a final state never changes");
            assert!(old.review.is_none() && new.review.is_some());
            let mut unreviewed = new.clone();
            unreviewed.review = None;
            unreviewed.version = old.version;
            assert_eq!(&unreviewed, old, "a review changes nothing else");
        }
    }
    assert!(new.duration_s <= new.max_duration_s);
    let approvers: BTreeSet<&str> = new.approvals.iter().map(|a| a.by.as_str()).collect();
    assert_eq!(
        approvers.len(),
        new.approvals.len(),
        "approvals are distinct"
    );
    assert!(
        !approvers.contains(new.requester.as_str()),
        "no self-approval"
    );
    if let Some(c) = &new.countersignature {
        assert_ne!(c.by, new.requester, "no self-countersignature");
    }
    if let Some(r) = &new.review {
        assert_ne!(r.by, new.requester, "no self-review");
    }
    if new.emergency {
        assert!(new.review_required, "emergency grants are always reviewed");
    }
    if let Some(activated) = new.activated_at {
        assert!(new.approvals.len() as u32 >= new.approvals_required);
        assert_eq!(new.expires_at, Some(activated.plus_secs(new.duration_s)));
    }
    if new.state == State::Active {
        let ends = [new.expires_at, new.countersign_by];
        assert!(ends.iter().flatten().all(|&e| Some(e) >= new.activated_at));
    }
}

/// Event details as `key=value`, timestamps shown relative to the epoch.
fn details(v: &serde_json::Value) -> String {
    let serde_json::Value::Object(map) = v else {
        return format!(" {}", canonical_json(v));
    };
    // Sorted, whatever serde_json's map order features are.
    let sorted: std::collections::BTreeMap<&String, &serde_json::Value> = map.iter().collect();
    let mut out = String::new();
    for (k, v) in sorted {
        let shown = match v {
            serde_json::Value::String(s) => match Timestamp::parse_rfc3339(s) {
                Ok(t) => rel(t),
                Err(_) => canonical_json(v),
            },
            _ => canonical_json(v),
        };
        let _ = write!(out, " {k}={shown}");
    }
    out
}

fn describe(r: &Request) -> String {
    let mut parts = vec![r.state.to_string()];
    if r.emergency {
        parts.push("emergency".into());
    }
    if r.state == State::Pending {
        let by: Vec<&str> = r.approvals.iter().map(|a| a.by.as_str()).collect();
        parts.push(format!(
            "approvals {}/{} [{}]",
            r.approvals.len(),
            r.approvals_required,
            by.join(", ")
        ));
        parts.push(format!("pending until {}", rel(r.pending_until)));
    }
    if let Some(t) = r.activated_at {
        parts.push(format!("activated {}", rel(t)));
    }
    if let Some(t) = r.expires_at {
        parts.push(format!("expires {}", rel(t)));
    }
    match (&r.countersignature, r.countersign_by) {
        (Some(c), _) => parts.push(format!("countersigned by {} {}", c.by, rel(c.at))),
        (None, Some(t)) => parts.push(format!("countersign by {}", rel(t))),
        (None, None) => {}
    }
    if let (Some(t), Some(reason)) = (r.ended_at, r.end_reason) {
        let by = r.ended_by.as_deref().unwrap_or("?");
        parts.push(format!("ended {} by {by} ({reason})", rel(t)));
    }
    if r.review_required {
        parts.push("review required".into());
    }
    if let Some(rv) = &r.review {
        parts.push(format!(
            "reviewed {:?} by {} {}",
            rv.outcome,
            rv.by,
            rel(rv.at)
        ));
    }
    parts.join("; ")
}

fn transcript(script: &str) -> (String, World) {
    let mut world = World::new();
    let out = run_script(&mut world, script);
    (out, world)
}

fn run_script(world: &mut World, script: &str) -> String {
    let mut out = String::new();
    for text in script.lines().map(str::trim) {
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let _ = writeln!(out, "{text}");
        match world.run(&Line::parse(text)) {
            Ok(s) => out.push_str(&s),
            Err(e) => {
                let _ = writeln!(out, "  error: {e}");
            }
        }
    }
    out
}

fn check(script: &str, expect: Expect) {
    let (out, _) = transcript(script);
    expect.assert_eq(&out);
}

#[test]
fn dsl_times_roundtrip() {
    for text in ["@0s", "@1ms", "@5s", "@15m4s999ms", "@1h30m", "@2h0m1s"] {
        let t = at(parse_at(text));
        assert_eq!(at(parse_at(&rel(t))), t, "{text}");
    }
    assert_eq!(rel(at(15 * MINUTE_MS + 4_999)), "@15m4s999ms");
    assert_eq!(rel(at(-1)), "@-1ms");
}

#[test]
fn one_approval_then_expiry_to_the_millisecond() {
    check(
        r#"
        request alice prod-db read 15m "slow queries on orders" @0s
        approve bob "go" @5s
        live @15m4s999ms
        tick @15m4s999ms
        live @15m5s
        approve carol @15m5s
        tick @15m5s
        tick @15m6s
        "#,
        expect![[r#"
            request alice prod-db read 15m "slow queries on orders" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="slow queries on orders" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob "go" @5s
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment="go"
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@15m5s
              => active; activated @5s; expires @15m5s
            live @15m4s999ms
              live: yes
            tick @15m4s999ms
              error: nothing is due
            live @15m5s
              live: no
            approve carol @15m5s
              error: cannot approve a request that is active but past its deadline
            tick @15m5s
              request.expired by system: expires_at=@15m5s lateness_ms=0
              => expired; activated @5s; expires @15m5s; ended @15m5s by system (expired)
            tick @15m6s
              error: cannot tick a request that is expired
        "#]],
    );
}

#[test]
fn clock_starts_at_activation_not_at_request() {
    check(
        r#"
        request alice prod-db read 30m "backfill check" @0s
        live @10m
        approve bob @20m
        # 30 minutes after the request: a clock started at request would expire here.
        tick @30m
        live @30m
        tick @49m59s999ms
        tick @50m
        "#,
        expect![[r#"
            request alice prod-db read 30m "backfill check" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=1800 emergency=false policy="oncall-db-read" reason="backfill check" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            live @10m
              live: no
            approve bob @20m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=1800 emergency=false expires_at=@50m
              => active; activated @20m; expires @50m
            tick @30m
              error: nothing is due
            live @30m
              live: yes
            tick @49m59s999ms
              error: nothing is due
            tick @50m
              request.expired by system: expires_at=@50m lateness_ms=0
              => expired; activated @20m; expires @50m; ended @50m by system (expired)
        "#]],
    );
}

#[test]
fn two_approvals_from_distinct_people() {
    check(
        r#"
        request alice prod-db admin 15m "drop a stuck lock" ticket=INC-42 @0s
        approve bob @1m
        # The same person twice is refused and does not count.
        approve bob "again" @2m
        # carol is in both sre-leads and security: she still counts once.
        approve carol @3m
        approve carol @4m
        "#,
        expect![[r#"
            request alice prod-db admin 15m "drop a stuck lock" ticket=INC-42 @0s
              request.created by alice: approvals_required=2 approver_groups=["security","sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-admin" reason="drop a stuck lock" role="admin" target="prod-db" ticket="INC-42"
              => pending; approvals 0/2 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=2 auth_method="local" comment=null
              => pending; approvals 1/2 [bob]; pending until @30m
            approve bob "again" @2m
              error: bob has already approved this request
            approve carol @3m
              request.approved by carol: approvals=2 approvals_required=2 auth_method="local" comment=null
              request.activated by carol: auth_method="local" duration_s=900 emergency=false expires_at=@18m
              => active; activated @3m; expires @18m
            approve carol @4m
              error: cannot approve a request that is active and needs no countersignature
        "#]],
    );
    check(
        r#"
        request alice prod-db admin 15m "drop a stuck lock" ticket=INC-42 @0s
        approve carol @1m
        approve carol @2m
        approve dave @3m
        "#,
        expect![[r#"
            request alice prod-db admin 15m "drop a stuck lock" ticket=INC-42 @0s
              request.created by alice: approvals_required=2 approver_groups=["security","sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-admin" reason="drop a stuck lock" role="admin" target="prod-db" ticket="INC-42"
              => pending; approvals 0/2 []; pending until @30m
            approve carol @1m
              request.approved by carol: approvals=1 approvals_required=2 auth_method="local" comment=null
              => pending; approvals 1/2 [carol]; pending until @30m
            approve carol @2m
              error: carol has already approved this request
            approve dave @3m
              request.approved by dave: approvals=2 approvals_required=2 auth_method="local" comment=null
              request.activated by dave: auth_method="local" duration_s=900 emergency=false expires_at=@18m
              => active; activated @3m; expires @18m
        "#]],
    );
}

#[test]
fn self_approval_is_refused_even_for_an_eligible_approver() {
    check(
        r#"
        # frank is oncall and in sre-leads, the approver group of his own request.
        request frank prod-db read 10m "look at replication" @0s
        approve frank @1m
        deny frank "changed my mind" @1m
        approve bob @2m
        tick @12m
        review frank ok "all fine" @13m
        review bob ok "all fine" @13m
        "#,
        expect![[r#"
            request frank prod-db read 10m "look at replication" @0s
              request.created by frank: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=false policy="oncall-db-read" reason="look at replication" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve frank @1m
              error: the requester cannot approve, deny, countersign or review their own request
            deny frank "changed my mind" @1m
              error: the requester cannot approve, deny, countersign or review their own request
            approve bob @2m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=600 emergency=false expires_at=@12m
              => active; activated @2m; expires @12m
            tick @12m
              request.expired by system: expires_at=@12m lateness_ms=0
              => expired; activated @2m; expires @12m; ended @12m by system (expired)
            review frank ok "all fine" @13m
              error: the requester cannot approve, deny, countersign or review their own request
            review bob ok "all fine" @13m
              request.reviewed by bob: auth_method="local" notes="all fine" outcome="ok"
              => expired; activated @2m; expires @12m; ended @12m by system (expired); reviewed Ok by bob @13m
        "#]],
    );
}

#[test]
fn self_approval_is_refused_as_such_in_every_state() {
    check(
        r#"
        # Active without a countersignature to give, and ended: the refusal
        # names self-approval, not the state.
        request alice prod-db read 10m "look at replication" @0s
        approve bob @1m
        approve alice @2m
        tick @11m
        approve alice @12m
        "#,
        expect![[r#"
            request alice prod-db read 10m "look at replication" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=false policy="oncall-db-read" reason="look at replication" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=600 emergency=false expires_at=@11m
              => active; activated @1m; expires @11m
            approve alice @2m
              error: the requester cannot approve, deny, countersign or review their own request
            tick @11m
              request.expired by system: expires_at=@11m lateness_ms=0
              => expired; activated @1m; expires @11m; ended @11m by system (expired)
            approve alice @12m
              error: the requester cannot approve, deny, countersign or review their own request
        "#]],
    );
}

#[test]
fn admin_cannot_approve_outside_approvers_but_can_revoke() {
    check(
        r#"
        request alice prod-db read 15m "read logs table" @0s
        approve root @1m
        deny root "no" @1m
        # dave is in security, which does not approve read grants, and is no admin.
        approve dave @1m
        approve bob @2m
        revoke dave "stop" @3m
        revoke mallory "stop" @3m
        revoke root "suspicious activity" @4m
        revoke bob "too late" @5m
        "#,
        expect![[r#"
            request alice prod-db read 15m "read logs table" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="read logs table" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve root @1m
              error: root is not an eligible approver for this request (eligible groups: sre-leads)
            deny root "no" @1m
              error: root is not an eligible approver for this request (eligible groups: sre-leads)
            approve dave @1m
              error: dave is not an eligible approver for this request (eligible groups: sre-leads)
            approve bob @2m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@17m
              => active; activated @2m; expires @17m
            revoke dave "stop" @3m
              error: dave may not revoke this grant: only the requester, an eligible approver or an admin can
            revoke mallory "stop" @3m
              error: mallory may not revoke this grant: only the requester, an eligible approver or an admin can
            revoke root "suspicious activity" @4m
              request.revoked by root: auth_method="local" end_reason="revoked" reason="suspicious activity"
              => revoked; activated @2m; expires @17m; ended @4m by root (revoked)
            revoke bob "too late" @5m
              error: cannot revoke a request that is revoked
        "#]],
    );
}

#[test]
fn requester_release_and_approver_revoke() {
    check(
        r#"
        request alice prod-db read 15m "quick look" @0s
        approve bob @1m
        revoke alice "done early" @3m
        review bob ok "short and clean" @4m
        request alice prod-db read 15m "another look" @10m
        approve carol @11m
        revoke bob "enough" @12m
        "#,
        expect![[r#"
            request alice prod-db read 15m "quick look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="quick look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@16m
              => active; activated @1m; expires @16m
            revoke alice "done early" @3m
              request.revoked by alice: auth_method="local" end_reason="released" reason="done early"
              => revoked; activated @1m; expires @16m; ended @3m by alice (released)
            review bob ok "short and clean" @4m
              request.reviewed by bob: auth_method="local" notes="short and clean" outcome="ok"
              => revoked; activated @1m; expires @16m; ended @3m by alice (released); reviewed Ok by bob @4m
            request alice prod-db read 15m "another look" @10m
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="another look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @40m
            approve carol @11m
              request.approved by carol: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by carol: auth_method="local" duration_s=900 emergency=false expires_at=@26m
              => active; activated @11m; expires @26m
            revoke bob "enough" @12m
              request.revoked by bob: auth_method="local" end_reason="revoked" reason="enough"
              => revoked; activated @11m; expires @26m; ended @12m by bob (revoked)
        "#]],
    );
}

#[test]
fn any_eligible_approver_can_veto() {
    check(
        r#"
        request alice prod-db admin 15m "rebuild index" ticket=INC-7 @0s
        approve bob @1m
        deny mallory "no" @2m
        deny dave "not during the freeze" @2m
        approve carol @3m
        cancel alice @3m
        "#,
        expect![[r#"
            request alice prod-db admin 15m "rebuild index" ticket=INC-7 @0s
              request.created by alice: approvals_required=2 approver_groups=["security","sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-admin" reason="rebuild index" role="admin" target="prod-db" ticket="INC-7"
              => pending; approvals 0/2 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=2 auth_method="local" comment=null
              => pending; approvals 1/2 [bob]; pending until @30m
            deny mallory "no" @2m
              error: mallory is not an eligible approver for this request (eligible groups: security, sre-leads)
            deny dave "not during the freeze" @2m
              request.denied by dave: auth_method="local" reason="not during the freeze"
              => denied; ended @2m by dave (denied)
            approve carol @3m
              error: cannot approve a request that is denied
            cancel alice @3m
              error: cannot cancel a request that is denied
        "#]],
    );
}

#[test]
fn only_the_requester_cancels_and_only_while_pending() {
    check(
        r#"
        request alice prod-db read 15m "check a row" @0s
        cancel bob @1m
        cancel root @1m
        cancel alice @2m
        cancel alice @3m
        approve bob @3m
        request alice prod-db read 15m "check again" @5m
        approve bob @6m
        cancel alice @7m
        "#,
        expect![[r#"
            request alice prod-db read 15m "check a row" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="check a row" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            cancel bob @1m
              error: only the requester can cancel this request
            cancel root @1m
              error: only the requester can cancel this request
            cancel alice @2m
              request.cancelled by alice: auth_method="local"
              => cancelled; ended @2m by alice (cancelled)
            cancel alice @3m
              error: cannot cancel a request that is cancelled
            approve bob @3m
              error: cannot approve a request that is cancelled
            request alice prod-db read 15m "check again" @5m
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="check again" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @35m
            approve bob @6m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@21m
              => active; activated @6m; expires @21m
            cancel alice @7m
              error: cannot cancel a request that is active
        "#]],
    );
}

#[test]
fn pending_requests_time_out() {
    check(
        r#"
        request alice prod-db read 15m "nobody around" @0s
        tick @29m59s999ms
        approve bob @30m
        deny bob "late" @30m
        cancel alice @30m
        tick @30m
        approve bob @31m
        "#,
        expect![[r#"
            request alice prod-db read 15m "nobody around" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="nobody around" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            tick @29m59s999ms
              error: nothing is due
            approve bob @30m
              error: cannot approve a request that is pending but past its pending timeout
            deny bob "late" @30m
              error: cannot deny a request that is pending but past its pending timeout
            cancel alice @30m
              error: cannot cancel a request that is pending but past its pending timeout
            tick @30m
              request.timed_out by system: pending_until=@30m
              => timed_out; ended @30m by system (timed_out)
            approve bob @31m
              error: cannot approve a request that is timed_out
        "#]],
    );
}

#[test]
fn duration_beyond_the_policy_is_refused_not_shortened() {
    check(
        r#"
        request alice prod-db read 31m "long look" @0s
        request alice prod-db read 30m1s "long look" @0s
        request alice prod-db admin 16m "long fix" ticket=INC-1 @0s
        emergency erin prod-db admin 11m "long outage" @0s
        request alice prod-db read 30m "long look" @0s
        request alice prod-db read 0s "no time" @0s
        "#,
        expect![[r#"
            request alice prod-db read 31m "long look" @0s
              error: requested duration 31m exceeds the maximum of 30m set by policy oncall-db-read
            request alice prod-db read 30m1s "long look" @0s
              error: requested duration 30m1s exceeds the maximum of 30m set by policy oncall-db-read
            request alice prod-db admin 16m "long fix" ticket=INC-1 @0s
              error: requested duration 16m exceeds the maximum of 15m set by policy oncall-db-admin
            emergency erin prod-db admin 11m "long outage" @0s
              error: requested duration 11m exceeds the maximum of 10m set by policy ic-emergency
            request alice prod-db read 30m "long look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=1800 emergency=false policy="oncall-db-read" reason="long look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            request alice prod-db read 0s "no time" @0s
              error: invalid request: duration must be between 1s and 168h
        "#]],
    );
}

#[test]
fn tickets_must_match_the_policy_pattern() {
    check(
        r#"
        request alice prod-db admin 10m "fix" @0s
        request alice prod-db admin 10m "fix" ticket=inc-12 @0s
        request alice prod-db admin 10m "fix" ticket=INC-12x @0s
        request alice prod-db admin 10m "fix" ticket=INC-12 @0s
        # A ticket nobody asked for is kept but not checked.
        request alice prod-db read 10m "look" ticket=whatever @0s
        "#,
        expect![[r#"
            request alice prod-db admin 10m "fix" @0s
              error: policy oncall-db-admin requires a ticket matching ^INC-[0-9]+$
            request alice prod-db admin 10m "fix" ticket=inc-12 @0s
              error: ticket "inc-12" does not match ^INC-[0-9]+$ required by policy oncall-db-admin
            request alice prod-db admin 10m "fix" ticket=INC-12x @0s
              error: ticket "INC-12x" does not match ^INC-[0-9]+$ required by policy oncall-db-admin
            request alice prod-db admin 10m "fix" ticket=INC-12 @0s
              request.created by alice: approvals_required=2 approver_groups=["security","sre-leads"] auth_method="local" duration_s=600 emergency=false policy="oncall-db-admin" reason="fix" role="admin" target="prod-db" ticket="INC-12"
              => pending; approvals 0/2 []; pending until @30m
            request alice prod-db read 10m "look" ticket=whatever @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket="whatever"
              => pending; approvals 0/1 []; pending until @30m
        "#]],
    );
}

#[test]
fn emergency_activates_at_once_and_is_countersigned() {
    check(
        r#"
        emergency erin prod-db admin 10m "primary down, nobody answers" @0s
        live @0s
        approve erin @1m
        approve dave @1m
        approve bob "seen, go ahead" @2m
        approve carol @3m
        tick @9m59s999ms
        tick @10m
        review erin ok "fine" @11m
        review bob ok "justified: primary was down" @11m
        review carol misuse "second opinion" @12m
        "#,
        expect![[r#"
            emergency erin prod-db admin 10m "primary down, nobody answers" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down, nobody answers" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            live @0s
              live: yes
            approve erin @1m
              error: the requester cannot approve, deny, countersign or review their own request
            approve dave @1m
              error: dave is not an eligible approver for this request (eligible groups: sre-leads)
            approve bob "seen, go ahead" @2m
              request.countersigned by bob: auth_method="local" comment="seen, go ahead"
              => active; emergency; activated @0s; expires @10m; countersigned by bob @2m; review required
            approve carol @3m
              error: cannot approve a request that is active and already countersigned
            tick @9m59s999ms
              error: nothing is due
            tick @10m
              request.expired by system: expires_at=@10m lateness_ms=0
              => expired; emergency; activated @0s; expires @10m; countersigned by bob @2m; ended @10m by system (expired); review required
            review erin ok "fine" @11m
              error: the requester cannot approve, deny, countersign or review their own request
            review bob ok "justified: primary was down" @11m
              request.reviewed by bob: auth_method="local" notes="justified: primary was down" outcome="ok"
              => expired; emergency; activated @0s; expires @10m; countersigned by bob @2m; ended @10m by system (expired); review required; reviewed Ok by bob @11m
            review carol misuse "second opinion" @12m
              error: this request has already been reviewed
        "#]],
    );
}

#[test]
fn emergency_without_countersignature_is_revoked() {
    check(
        r#"
        emergency erin prod-db admin 10m "primary down" @0s
        tick @9m59s999ms
        # The deadline has passed: countersigning now is refused, only tick works.
        approve bob @10m
        tick @10m
        approve bob @11m
        review bob misuse "nobody countersigned" @12m
        "#,
        expect![[r#"
            emergency erin prod-db admin 10m "primary down" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            tick @9m59s999ms
              request.revoked by system: countersign_by=@5m end_reason="not_countersigned" lateness_ms=299999
              => revoked; emergency; activated @0s; expires @10m; countersign by @5m; ended @9m59s999ms by system (not_countersigned); review required
            approve bob @10m
              error: cannot approve a request that is revoked
            tick @10m
              error: cannot tick a request that is revoked
            approve bob @11m
              error: cannot approve a request that is revoked
            review bob misuse "nobody countersigned" @12m
              request.reviewed by bob: auth_method="local" notes="nobody countersigned" outcome="misuse"
              => revoked; emergency; activated @0s; expires @10m; countersign by @5m; ended @9m59s999ms by system (not_countersigned); review required; reviewed Misuse by bob @12m
        "#]],
    );
    // The countersignature window of oncall-emergency-read (2m) is shorter
    // than the grant: the grant is revoked before it expires.
    check(
        r#"
        emergency alice prod-db read 10m "dashboards down" @0s
        tick @1m59s999ms
        tick @2m
        "#,
        expect![[r#"
            emergency alice prod-db read 10m "dashboards down" @0s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
            tick @1m59s999ms
              error: nothing is due
            tick @2m
              request.revoked by system: countersign_by=@2m end_reason="not_countersigned" lateness_ms=0
              => revoked; emergency; activated @0s; expires @10m; countersign by @2m; ended @2m by system (not_countersigned); review required
        "#]],
    );
    // A grant that expires before its countersignature is due just expires.
    check(
        r#"
        emergency erin prod-db admin 5m "quick fix" @0s
        tick @5m
        "#,
        expect![[r#"
            emergency erin prod-db admin 5m "quick fix" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=300 emergency=true policy="ic-emergency" reason="quick fix" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=300 emergency=true expires_at=@5m
              => active; emergency; activated @0s; expires @5m; countersign by @5m; review required
            tick @5m
              request.revoked by system: countersign_by=@5m end_reason="not_countersigned" lateness_ms=0
              => revoked; emergency; activated @0s; expires @5m; countersign by @5m; ended @5m by system (not_countersigned); review required
        "#]],
    );
}

#[test]
fn emergency_needs_an_emergency_policy() {
    check(
        r#"
        emergency alice prod-db admin 5m "I am not an incident commander" @0s
        emergency mallory prod-db read 5m "me neither" @0s
        # erin matches ic-emergency and oncall-emergency-read: the 2m window governs.
        emergency erin prod-db read 10m "both" @0s
        "#,
        expect![[r#"
            emergency alice prod-db admin 5m "I am not an incident commander" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            emergency mallory prod-db read 5m "me neither" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            emergency erin prod-db read 10m "both" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency,oncall-emergency-read" reason="both" role="read" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
        "#]],
    );
}

#[test]
fn reviews_only_on_ended_grants_by_others_and_once() {
    check(
        r#"
        request alice prod-db read 15m "look" @0s
        review bob ok "too early" @1m
        approve bob @1m
        review bob ok "still too early" @2m
        tick @16m
        review alice ok "I reviewed myself" @17m
        review mallory ok "drive-by" @17m
        review root ok "admin is not an approver here" @17m
        review bob ok "" @17m
        review bob ok "fine" @17m
        review carol misuse "disagree" @18m
        request alice prod-db read 15m "look again" @20m
        deny bob "no" @21m
        review carol ok "denied requests are not grants" @22m
        "#,
        expect![[r#"
            request alice prod-db read 15m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            review bob ok "too early" @1m
              error: cannot review a request that is pending: only ended grants (expired or revoked) are reviewed
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@16m
              => active; activated @1m; expires @16m
            review bob ok "still too early" @2m
              error: cannot review a request that is active: only ended grants (expired or revoked) are reviewed
            tick @16m
              request.expired by system: expires_at=@16m lateness_ms=0
              => expired; activated @1m; expires @16m; ended @16m by system (expired)
            review alice ok "I reviewed myself" @17m
              error: the requester cannot approve, deny, countersign or review their own request
            review mallory ok "drive-by" @17m
              error: mallory is not an eligible approver for this request (eligible groups: sre-leads)
            review root ok "admin is not an approver here" @17m
              error: root is not an eligible approver for this request (eligible groups: sre-leads)
            review bob ok "" @17m
              error: invalid request: notes must not be empty
            review bob ok "fine" @17m
              request.reviewed by bob: auth_method="local" notes="fine" outcome="ok"
              => expired; activated @1m; expires @16m; ended @16m by system (expired); reviewed Ok by bob @17m
            review carol misuse "disagree" @18m
              error: this request has already been reviewed
            request alice prod-db read 15m "look again" @20m
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="look again" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @50m
            deny bob "no" @21m
              request.denied by bob: auth_method="local" reason="no"
              => denied; ended @21m by bob (denied)
            review carol ok "denied requests are not grants" @22m
              error: cannot review a request that is denied: only ended grants (expired or revoked) are reviewed
        "#]],
    );
}

#[test]
fn final_states_never_change() {
    check(
        r#"
        request alice prod-db read 5m "look" @0s
        approve bob @1m
        tick @6m
        approve carol @7m
        deny carol "no" @7m
        cancel alice @7m
        revoke root "stop" @7m
        revoke alice "release" @7m
        tick @7m
        tick @1h
        "#,
        expect![[r#"
            request alice prod-db read 5m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=300 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=300 emergency=false expires_at=@6m
              => active; activated @1m; expires @6m
            tick @6m
              request.expired by system: expires_at=@6m lateness_ms=0
              => expired; activated @1m; expires @6m; ended @6m by system (expired)
            approve carol @7m
              error: cannot approve a request that is expired
            deny carol "no" @7m
              error: cannot deny a request that is expired
            cancel alice @7m
              error: cannot cancel a request that is expired
            revoke root "stop" @7m
              error: cannot revoke a request that is expired
            revoke alice "release" @7m
              error: cannot revoke a request that is expired
            tick @7m
              error: cannot tick a request that is expired
            tick @1h
              error: cannot tick a request that is expired
        "#]],
    );
}

#[test]
fn past_its_deadline_only_tick_acts() {
    check(
        r#"
        request alice prod-db read 5m "look" @0s
        approve bob @1m
        revoke root "stop" @6m
        revoke alice "release" @6m
        review bob ok "early" @6m
        live @6m
        tick @6m
        "#,
        expect![[r#"
            request alice prod-db read 5m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=300 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=300 emergency=false expires_at=@6m
              => active; activated @1m; expires @6m
            revoke root "stop" @6m
              error: cannot revoke a request that is active but past its deadline
            revoke alice "release" @6m
              error: cannot revoke a request that is active but past its deadline
            review bob ok "early" @6m
              error: cannot review a request that is active but past its deadline
            live @6m
              live: no
            tick @6m
              request.expired by system: expires_at=@6m lateness_ms=0
              => expired; activated @1m; expires @6m; ended @6m by system (expired)
        "#]],
    );
}

#[test]
fn service_and_people_have_separate_commands() {
    check(
        r#"
        request alice prod-db read 5m "look" @0s
        tick alice @1m
        tick bob @31m
        approve system @1m
        cancel system @1m
        "#,
        expect![[r#"
            request alice prod-db read 5m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=300 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            tick alice @1m
              error: invalid request: tick is for the service only
            tick bob @31m
              error: invalid request: tick is for the service only
            approve system @1m
              error: invalid request: approve needs a person
            cancel system @1m
              error: invalid request: cancel needs a person
        "#]],
    );
}

#[test]
fn strictest_obligations_govern_when_permits_overlap() {
    // pay-db is production and payments: oncall-db-read (1 approval from
    // sre-leads, 30m) and payments (2 from payments-leads, 20m, long ticket).
    check(
        r#"
        request alice pay-db read 25m "refund stuck" ticket=PAY-1234 @0s
        request alice pay-db read 20m "refund stuck" @0s
        request alice pay-db read 20m "refund stuck" ticket=PAY-1 @0s
        request alice pay-db read 20m "refund stuck" ticket=PAY-1234 @0s
        approve bob @1m
        approve paula @2m
        "#,
        expect![[r#"
            request alice pay-db read 25m "refund stuck" ticket=PAY-1234 @0s
              error: requested duration 25m exceeds the maximum of 20m set by policy oncall-db-read,payments
            request alice pay-db read 20m "refund stuck" @0s
              error: policy payments requires a ticket matching ^[A-Z]+-[0-9]{4,}$
            request alice pay-db read 20m "refund stuck" ticket=PAY-1 @0s
              error: ticket "PAY-1" does not match ^[A-Z]+-[0-9]{4,}$ required by policy payments
            request alice pay-db read 20m "refund stuck" ticket=PAY-1234 @0s
              request.created by alice: approvals_required=2 approver_groups=["payments-leads","sre-leads"] auth_method="local" duration_s=1200 emergency=false policy="oncall-db-read,payments" reason="refund stuck" role="read" target="pay-db" ticket="PAY-1234"
              => pending; approvals 0/2 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=2 auth_method="local" comment=null
              => pending; approvals 1/2 [bob]; pending until @30m
            approve paula @2m
              request.approved by paula: approvals=2 approvals_required=2 auth_method="local" comment=null
              request.activated by paula: auth_method="local" duration_s=1200 emergency=false expires_at=@22m
              => active; activated @2m; expires @22m
        "#]],
    );
    // Admin on pay-db: both ticket patterns must match.
    check(
        r#"
        request alice pay-db admin 15m "fix ledger" ticket=INC-12 @0s
        request alice pay-db admin 15m "fix ledger" ticket=PAY-1234 @0s
        request alice pay-db admin 15m "fix ledger" ticket=INC-1234 @0s
        approve dave @1m
        approve paula @2m
        "#,
        expect![[r#"
            request alice pay-db admin 15m "fix ledger" ticket=INC-12 @0s
              error: ticket "INC-12" does not match ^[A-Z]+-[0-9]{4,}$ required by policy payments
            request alice pay-db admin 15m "fix ledger" ticket=PAY-1234 @0s
              error: ticket "PAY-1234" does not match ^INC-[0-9]+$ required by policy oncall-db-admin
            request alice pay-db admin 15m "fix ledger" ticket=INC-1234 @0s
              request.created by alice: approvals_required=2 approver_groups=["payments-leads","security","sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-admin,payments" reason="fix ledger" role="admin" target="pay-db" ticket="INC-1234"
              => pending; approvals 0/2 []; pending until @30m
            approve dave @1m
              request.approved by dave: approvals=1 approvals_required=2 auth_method="local" comment=null
              => pending; approvals 1/2 [dave]; pending until @30m
            approve paula @2m
              request.approved by paula: approvals=2 approvals_required=2 auth_method="local" comment=null
              request.activated by paula: auth_method="local" duration_s=900 emergency=false expires_at=@17m
              => active; activated @2m; expires @17m
        "#]],
    );
}

#[test]
fn forbid_wins_over_any_permit() {
    check(
        r#"
        request alice prod-db batch 2h "reindex" @0s
        request alice prod-db batch 1h1s "reindex" @0s
        request alice prod-db batch 1h "reindex" @0s
        "#,
        expect![[r#"
            request alice prod-db batch 2h "reindex" @0s
              error: no policy permits this: forbidden by no-long-grants
            request alice prod-db batch 1h1s "reindex" @0s
              error: no policy permits this: forbidden by no-long-grants
            request alice prod-db batch 1h "reindex" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=3600 emergency=false policy="batch-window" reason="reindex" role="batch" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
        "#]],
    );
}

#[test]
fn requests_outside_every_policy_are_denied_with_a_reason() {
    check(
        r#"
        request mallory prod-db read 5m "curious" @0s
        request alice staging-db read 5m "wrong target" @0s
        request alice prod-db write 5m "wrong role" @0s
        request bob prod-db read 5m "approvers are not requesters" @0s
        request drill-bot prod-db read 5m "drills stay on the canary" @0s
        "#,
        expect![[r#"
            request mallory prod-db read 5m "curious" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            request alice staging-db read 5m "wrong target" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            request alice prod-db write 5m "wrong role" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            request bob prod-db read 5m "approvers are not requesters" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
            request drill-bot prod-db read 5m "drills stay on the canary" @0s
              error: no policy permits this: no permit policy matches this principal, action, target and context
        "#]],
    );
}

#[test]
fn zero_approval_drill_activates_at_once() {
    check(
        r#"
        request drill-bot canary-db read 2m "scheduled drill" @0s
        live @1m59s999ms
        live @2m
        tick @2m
        review bob ok "nobody approves drills" @3m
        request drill-bot canary-db read 2m "scheduled drill" @10m
        revoke drill-bot "drill done" @10m500ms
        "#,
        expect![[r#"
            request drill-bot canary-db read 2m "scheduled drill" @0s
              request.created by drill-bot: approvals_required=0 approver_groups=[] auth_method="local" duration_s=120 emergency=false policy="drill" reason="scheduled drill" role="read" target="canary-db" ticket=null
              request.activated by drill-bot: auth_method="local" duration_s=120 emergency=false expires_at=@2m
              => active; activated @0s; expires @2m
            live @1m59s999ms
              live: yes
            live @2m
              live: no
            tick @2m
              request.expired by system: expires_at=@2m lateness_ms=0
              => expired; activated @0s; expires @2m; ended @2m by system (expired)
            review bob ok "nobody approves drills" @3m
              error: bob is not an eligible approver for this request (eligible groups: )
            request drill-bot canary-db read 2m "scheduled drill" @10m
              request.created by drill-bot: approvals_required=0 approver_groups=[] auth_method="local" duration_s=120 emergency=false policy="drill" reason="scheduled drill" role="read" target="canary-db" ticket=null
              request.activated by drill-bot: auth_method="local" duration_s=120 emergency=false expires_at=@12m
              => active; activated @10m; expires @12m
            revoke drill-bot "drill done" @10m500ms
              request.revoked by drill-bot: auth_method="local" end_reason="released" reason="drill done"
              => revoked; activated @10m; expires @12m; ended @10m500ms by drill-bot (released)
        "#]],
    );
}

#[test]
fn bad_input_is_refused_before_policy() {
    check(
        r#"
        request alice prod-db read 5m "" @0s
        request alice prod-db read 5m "   " @0s
        request alice prod/db read 5m "look" @0s
        request alice prod-db read 604801s "look" @0s
        request alice prod-db read 5m "look" ticket= @0s
        request alice prod-db read 5m "look" @0s
        deny bob "" @1m
        revoke bob "" @1m
        "#,
        expect![[r#"
            request alice prod-db read 5m "" @0s
              error: invalid request: reason must not be empty
            request alice prod-db read 5m "   " @0s
              error: invalid request: reason must not be empty
            request alice prod/db read 5m "look" @0s
              error: invalid request: target "prod/db" may only contain letters, digits and - _ . @ :
            request alice prod-db read 604801s "look" @0s
              error: invalid request: duration must be between 1s and 168h
            request alice prod-db read 5m "look" ticket= @0s
              error: invalid request: ticket must not be empty
            request alice prod-db read 5m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=300 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            deny bob "" @1m
              error: invalid request: reason must not be empty
            revoke bob "" @1m
              error: invalid request: reason must not be empty
        "#]],
    );
}

// ---------------------------------------------------------------------------
// Authorization matrix (DESIGN §2, §4, §9): every actor and command against
// every reachable state, judged by an oracle written from the design and
// compared with `lifecycle::step`. Zero bypasses, zero wrongful refusals.
// ---------------------------------------------------------------------------

/// A reachable state, produced by a script, and what the policy that governs
/// it says (written here from the policy text, not read from the request).
struct MatrixCase {
    name: &'static str,
    script: &'static str,
    /// The governing policies' `@approvers`.
    approvers: &'static [&'static str],
    /// `@countersign_within` of the governing policies, for emergency grants.
    countersign_within_s: Option<u64>,
}

const MATRIX: &[MatrixCase] = &[
    MatrixCase {
        name: "pending read, requester is an approver",
        script: r#"request frank prod-db read 15m "r" @0s"#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "pending admin, 1 of 2 approvals",
        script: r#"
            request alice prod-db admin 10m "r" ticket=INC-7 @0s
            approve bob @1m
        "#,
        approvers: &["sre-leads", "security"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "pending pay-db read, 2 policies",
        script: r#"request alice pay-db read 20m "r" ticket=PAY-1234 @0s"#,
        approvers: &["sre-leads", "payments-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "active read",
        script: r#"
            request alice prod-db read 15m "r" @0s
            approve bob @1m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "active emergency, awaiting countersignature",
        script: r#"emergency erin prod-db admin 10m "r" @0s"#,
        approvers: &["sre-leads"],
        countersign_within_s: Some(300),
    },
    MatrixCase {
        name: "active emergency, countersign due before expiry",
        script: r#"emergency alice prod-db read 10m "r" @0s"#,
        approvers: &["sre-leads"],
        countersign_within_s: Some(120),
    },
    MatrixCase {
        name: "active emergency, countersigned",
        script: r#"
            emergency erin prod-db admin 10m "r" @0s
            approve carol @1m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: Some(300),
    },
    MatrixCase {
        name: "active drill, nobody approves",
        script: r#"request drill-bot canary-db read 5m "r" @0s"#,
        approvers: &[],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "denied",
        script: r#"
            request alice prod-db read 15m "r" @0s
            deny carol "no" @1m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "cancelled",
        script: r#"
            request alice prod-db read 15m "r" @0s
            cancel alice @1m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "timed out",
        script: r#"
            request alice prod-db read 15m "r" @0s
            tick @30m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "expired",
        script: r#"
            request alice prod-db read 15m "r" @0s
            approve bob @1m
            tick @16m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "expired emergency",
        script: r#"
            emergency erin prod-db admin 5m "r" @0s
            tick @5m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: Some(300),
    },
    MatrixCase {
        name: "revoked by an admin",
        script: r#"
            request alice prod-db read 15m "r" @0s
            approve bob @1m
            revoke root "stop" @2m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "released by the requester",
        script: r#"
            request alice prod-db read 15m "r" @0s
            approve bob @1m
            revoke alice "done" @2m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
    MatrixCase {
        name: "revoked, not countersigned",
        script: r#"
            emergency erin prod-db admin 10m "r" @0s
            tick @10m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: Some(300),
    },
    MatrixCase {
        name: "expired and reviewed",
        script: r#"
            request alice prod-db read 15m "r" @0s
            approve bob @1m
            tick @16m
            review carol ok "fine" @17m
        "#,
        approvers: &["sre-leads"],
        countersign_within_s: None,
    },
];

fn matrix_commands() -> Vec<Command> {
    vec![
        Command::Approve { comment: None },
        Command::Deny {
            reason: "no".into(),
        },
        Command::Cancel,
        Command::Revoke {
            reason: "stop".into(),
        },
        Command::Review {
            outcome: ReviewOutcome::Ok,
            notes: "checked".into(),
        },
        Command::Tick,
        Command::Offboard,
    ]
}

/// What the design says should happen: `None` if the actor may not do this,
/// else the resulting state and end reason.
fn oracle(
    case: &MatrixCase,
    req: &Request,
    who: &Actor,
    cmd: &Command,
    now: Timestamp,
) -> Option<(State, Option<EndReason>)> {
    // Deadlines from the design: pending timeout from creation; grants end
    // at activation + duration, or earlier when an emergency grant is not
    // countersigned within the policy's window (counted from activation).
    let pending_until = req.created_at.plus_secs(PENDING_TIMEOUT_S);
    let expires = req.activated_at.map(|a| a.plus_secs(req.duration_s));
    let countersign_by = match (req.emergency, case.countersign_within_s, req.activated_at) {
        (true, Some(w), Some(a)) if req.countersignature.is_none() => Some(a.plus_secs(w)),
        _ => None,
    };
    let due = match req.state {
        State::Pending => now >= pending_until,
        State::Active => {
            expires.is_some_and(|e| now >= e) || countersign_by.is_some_and(|c| now >= c)
        }
        _ => false,
    };
    let p = match who {
        Actor::System => {
            return match (cmd, req.state) {
                (Command::Tick, State::Pending) if due => {
                    Some((State::TimedOut, Some(EndReason::TimedOut)))
                }
                (Command::Tick, State::Active) if due => {
                    let missed = countersign_by.is_some_and(|c| now >= c);
                    Some(if missed {
                        (State::Revoked, Some(EndReason::NotCountersigned))
                    } else {
                        (State::Expired, Some(EndReason::Expired))
                    })
                }
                // The requester left: whatever is still open ends, unless a
                // deadline passed first (then the deadline decides).
                (Command::Offboard, State::Pending) if !due => {
                    Some((State::Cancelled, Some(EndReason::PrincipalRemoved)))
                }
                (Command::Offboard, State::Active) if !due => {
                    Some((State::Revoked, Some(EndReason::PrincipalRemoved)))
                }
                _ => None,
            };
        }
        Actor::Principal(p) => p,
    };
    let is_requester = p.name == req.requester;
    // DESIGN §4: approvals are by people. A workload may only withdraw or
    // release what it asked for itself.
    if p.kind == PrincipalKind::Workload {
        return match (cmd, req.state) {
            (_, State::Pending | State::Active) if due => None,
            (Command::Cancel, State::Pending) if is_requester => {
                Some((State::Cancelled, Some(EndReason::Cancelled)))
            }
            (Command::Revoke { .. }, State::Active) if is_requester => {
                Some((State::Revoked, Some(EndReason::Released)))
            }
            _ => None,
        };
    }
    let in_approver_group = case.approvers.iter().any(|g| p.groups.contains(*g));
    let eligible = !is_requester && in_approver_group;
    let already_approved = req.approvals.iter().any(|a| a.by == p.name);
    let unchanged = Some((req.state, req.end_reason));
    match (cmd, req.state) {
        (Command::Tick | Command::Offboard, _) => None,
        (_, State::Pending | State::Active) if due => None,
        (Command::Approve { .. }, State::Pending) if eligible && !already_approved => {
            let have = req.approvals.len() as u32 + 1;
            if have >= req.approvals_required {
                Some((State::Active, None))
            } else {
                unchanged
            }
        }
        (Command::Approve { .. }, State::Active)
            if eligible && countersign_by.is_some() && req.countersignature.is_none() =>
        {
            unchanged
        }
        (Command::Deny { .. }, State::Pending) if eligible => {
            Some((State::Denied, Some(EndReason::Denied)))
        }
        (Command::Cancel, State::Pending) if is_requester => {
            Some((State::Cancelled, Some(EndReason::Cancelled)))
        }
        (Command::Revoke { .. }, State::Active) if is_requester => {
            Some((State::Revoked, Some(EndReason::Released)))
        }
        (Command::Revoke { .. }, State::Active) if p.admin || eligible => {
            Some((State::Revoked, Some(EndReason::Revoked)))
        }
        (Command::Review { .. }, State::Expired | State::Revoked)
            if eligible && req.review.is_none() =>
        {
            unchanged
        }
        _ => None,
    }
}

#[test]
fn authorization_matrix_has_no_bypass() {
    let mut actors: Vec<Actor> = vec![Actor::System];
    actors.extend(PRINCIPALS.iter().map(|(n, _, _)| actor(n)));
    actors.push(workload_actor());
    let mut summary = String::new();
    let mut mismatches = Vec::new();
    let (mut tried, mut allowed) = (0, 0);
    for case in MATRIX {
        let (log, world) = transcript(case.script);
        assert!(
            !log.contains("error:"),
            "{}: setup failed:\n{log}",
            case.name
        );
        let req = world.current().clone();
        let approver_groups: BTreeSet<&str> =
            req.approver_groups.iter().map(String::as_str).collect();
        let expected: BTreeSet<&str> = case.approvers.iter().copied().collect();
        assert_eq!(approver_groups, expected, "{}: approver groups", case.name);
        // One moment well inside every deadline, the last millisecond before
        // the first deadline, the deadline itself, and much later.
        let last = [Some(req.created_at), req.activated_at, req.ended_at]
            .into_iter()
            .flatten()
            .chain(req.approvals.iter().map(|a| a.at))
            .max()
            .unwrap_or(req.created_at);
        let mut times = vec![Timestamp(last.millis() + 1000)];
        if let Some(d) = req.deadline() {
            times.extend([Timestamp(d.millis() - 1), d]);
        }
        times.push(Timestamp(last.millis() + 24 * 60 * MINUTE_MS));
        for now in times {
            let mut line = Vec::new();
            for cmd in matrix_commands() {
                let mut who_ok = Vec::new();
                for who in &actors {
                    tried += 1;
                    let want = oracle(case, &req, who, &cmd, now);
                    let got = lifecycle::step(&req, who, &cmd, now)
                        .map(|t| (t.request.state, t.request.end_reason));
                    if got.as_ref().ok() != want.as_ref() {
                        mismatches.push(format!(
                            "{} {}: {} by {}: design says {:?}, step gave {:?}",
                            case.name,
                            rel(now),
                            cmd.name(),
                            who.name(),
                            want,
                            got
                        ));
                    }
                    if got.is_ok() {
                        allowed += 1;
                        who_ok.push(who.name().to_string());
                    }
                }
                if !who_ok.is_empty() {
                    line.push(format!("{} by {}", cmd.name(), who_ok.join(",")));
                }
            }
            let _ = writeln!(
                summary,
                "{} {}: {}",
                case.name,
                rel(now),
                if line.is_empty() {
                    "nothing".to_string()
                } else {
                    line.join("; ")
                }
            );
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatch(es) between design and lifecycle:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    let _ = writeln!(
        summary,
        "{tried} combinations, {allowed} allowed, 0 mismatches"
    );
    expect![[r#"
        pending read, requester is an approver @1s: approve by bob,carol; deny by bob,carol; cancel by frank; offboard by system
        pending read, requester is an approver @29m59s999ms: approve by bob,carol; deny by bob,carol; cancel by frank; offboard by system
        pending read, requester is an approver @30m: tick by system
        pending read, requester is an approver @24h: tick by system
        pending admin, 1 of 2 approvals @1m1s: approve by carol,dave,frank,root; deny by bob,carol,dave,frank,root; cancel by alice; offboard by system
        pending admin, 1 of 2 approvals @29m59s999ms: approve by carol,dave,frank,root; deny by bob,carol,dave,frank,root; cancel by alice; offboard by system
        pending admin, 1 of 2 approvals @30m: tick by system
        pending admin, 1 of 2 approvals @24h1m: tick by system
        pending pay-db read, 2 policies @1s: approve by bob,carol,frank,paula; deny by bob,carol,frank,paula; cancel by alice; offboard by system
        pending pay-db read, 2 policies @29m59s999ms: approve by bob,carol,frank,paula; deny by bob,carol,frank,paula; cancel by alice; offboard by system
        pending pay-db read, 2 policies @30m: tick by system
        pending pay-db read, 2 policies @24h: tick by system
        active read @1m1s: revoke by alice,bob,carol,frank,root; offboard by system
        active read @15m59s999ms: revoke by alice,bob,carol,frank,root; offboard by system
        active read @16m: tick by system
        active read @24h1m: tick by system
        active emergency, awaiting countersignature @1s: approve by bob,carol,frank; revoke by bob,carol,erin,frank,root; offboard by system
        active emergency, awaiting countersignature @4m59s999ms: approve by bob,carol,frank; revoke by bob,carol,erin,frank,root; offboard by system
        active emergency, awaiting countersignature @5m: tick by system
        active emergency, awaiting countersignature @24h: tick by system
        active emergency, countersign due before expiry @1s: approve by bob,carol,frank; revoke by alice,bob,carol,frank,root; offboard by system
        active emergency, countersign due before expiry @1m59s999ms: approve by bob,carol,frank; revoke by alice,bob,carol,frank,root; offboard by system
        active emergency, countersign due before expiry @2m: tick by system
        active emergency, countersign due before expiry @24h: tick by system
        active emergency, countersigned @1s: revoke by bob,carol,erin,frank,root; offboard by system
        active emergency, countersigned @9m59s999ms: revoke by bob,carol,erin,frank,root; offboard by system
        active emergency, countersigned @10m: tick by system
        active emergency, countersigned @24h: tick by system
        active drill, nobody approves @1s: revoke by drill-bot,root; offboard by system
        active drill, nobody approves @4m59s999ms: revoke by drill-bot,root; offboard by system
        active drill, nobody approves @5m: tick by system
        active drill, nobody approves @24h: tick by system
        denied @1m1s: nothing
        denied @24h1m: nothing
        cancelled @1m1s: nothing
        cancelled @24h1m: nothing
        timed out @30m1s: nothing
        timed out @24h30m: nothing
        expired @16m1s: review by bob,carol,frank
        expired @24h16m: review by bob,carol,frank
        expired emergency @5m1s: review by bob,carol,frank
        expired emergency @24h5m: review by bob,carol,frank
        revoked by an admin @2m1s: review by bob,carol,frank
        revoked by an admin @24h2m: review by bob,carol,frank
        released by the requester @2m1s: review by bob,carol,frank
        released by the requester @24h2m: review by bob,carol,frank
        revoked, not countersigned @10m1s: review by bob,carol,frank
        revoked, not countersigned @24h10m: review by bob,carol,frank
        expired and reviewed @16m1s: nothing
        expired and reviewed @24h16m: nothing
        4200 combinations, 166 allowed, 0 mismatches
    "#]]
    .assert_eq(&summary);
}

/// One permit of `POLICY`, restated by hand for the creation oracle.
struct PermitRule {
    group: &'static str,
    emergency: bool,
    /// Matches a target in this target group, or this exact target.
    target_group: Option<&'static str>,
    target: Option<&'static str>,
    role: Option<&'static str>,
    approvals: u32,
    max_duration_s: u64,
}

const PERMITS: &[PermitRule] = &[
    // oncall-db-read
    PermitRule {
        group: "oncall",
        emergency: false,
        target_group: Some("production"),
        target: None,
        role: Some("read"),
        approvals: 1,
        max_duration_s: 1800,
    },
    // oncall-db-admin
    PermitRule {
        group: "oncall",
        emergency: false,
        target_group: Some("production"),
        target: None,
        role: Some("admin"),
        approvals: 2,
        max_duration_s: 900,
    },
    // ic-emergency
    PermitRule {
        group: "incident-commanders",
        emergency: true,
        target_group: Some("production"),
        target: None,
        role: None,
        approvals: 0,
        max_duration_s: 600,
    },
    // oncall-emergency-read
    PermitRule {
        group: "oncall",
        emergency: true,
        target_group: Some("production"),
        target: None,
        role: Some("read"),
        approvals: 0,
        max_duration_s: 600,
    },
    // payments
    PermitRule {
        group: "oncall",
        emergency: false,
        target_group: Some("payments"),
        target: None,
        role: None,
        approvals: 2,
        max_duration_s: 1200,
    },
    // batch-window
    PermitRule {
        group: "oncall",
        emergency: false,
        target_group: Some("production"),
        target: None,
        role: Some("batch"),
        approvals: 1,
        max_duration_s: 4 * 3600,
    },
    // drill
    PermitRule {
        group: "drillers",
        emergency: false,
        target_group: None,
        target: Some("canary-db"),
        role: None,
        approvals: 0,
        max_duration_s: 300,
    },
];

/// Who may ask for what (DESIGN §3, §9: requester outside the policy, role,
/// duration or target beyond it): every principal, target, role, action and
/// duration, judged by the hand-written `PERMITS` and the forbid, against
/// `PolicyEngine::evaluate` + `lifecycle::create`.
#[test]
fn creation_matrix_has_no_bypass() {
    let durations_s = [1, 300, 600, 601, 900, 1200, 1800, 3600, 3601, 4 * 3600];
    let mut mismatches = Vec::new();
    let mut summary = String::new();
    let (mut tried, mut allowed) = (0, 0);
    let mut world = World::new();
    for (name, groups, _) in PRINCIPALS {
        for (target, target_groups) in TARGETS {
            for emergency in [false, true] {
                for role in ["read", "admin", "batch", "write"] {
                    let matching: Vec<&PermitRule> = PERMITS
                        .iter()
                        .filter(|r| {
                            groups.contains(&r.group)
                                && r.emergency == emergency
                                && r.target_group.is_none_or(|g| target_groups.contains(&g))
                                && r.target.is_none_or(|t| t == *target)
                                && r.role.is_none_or(|x| x == role)
                        })
                        .collect();
                    let mut longest_ok = None;
                    for d in durations_s {
                        tried += 1;
                        // The ticket matches every pattern, so only who, what
                        // and how long decide.
                        let verb = if emergency { "emergency" } else { "request" };
                        let script = format!(
                            "{verb} {name} {target} {role} {d}s \"matrix\" ticket=INC-1234 @0s"
                        );
                        // Each line stands alone: no earlier emergency
                        // request of the matrix limits this one.
                        world.request = None;
                        world.history.clear();
                        run_script(&mut world, &script);
                        let got = world
                            .request
                            .as_ref()
                            .map(|r| (r.approvals_required, r.state, r.max_duration_s));
                        let forbidden = d > 3600;
                        let want = match matching.iter().map(|r| r.max_duration_s).min() {
                            Some(max) if !forbidden && d <= max => {
                                let approvals =
                                    matching.iter().map(|r| r.approvals).max().unwrap_or(0);
                                let state = if approvals == 0 {
                                    State::Active
                                } else {
                                    State::Pending
                                };
                                Some((approvals, state, max))
                            }
                            _ => None,
                        };
                        if got != want {
                            mismatches.push(format!("{script}: design {want:?}, core {got:?}"));
                        }
                        if let Some((approvals, _, _)) = got {
                            allowed += 1;
                            longest_ok = Some((d, approvals));
                        }
                    }
                    if let Some((d, n)) = longest_ok {
                        let verb = if emergency { "emergency" } else { "request" };
                        let _ = writeln!(
                            summary,
                            "{name} {verb} {target} {role}: up to {d}s, {n} approval(s)"
                        );
                    }
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatch(es) between design and core:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    let _ = writeln!(
        summary,
        "{tried} combinations, {allowed} allowed, 0 mismatches"
    );
    expect![[r#"
        alice request prod-db read: up to 1800s, 1 approval(s)
        alice request prod-db admin: up to 900s, 2 approval(s)
        alice request prod-db batch: up to 3600s, 1 approval(s)
        alice emergency prod-db read: up to 600s, 0 approval(s)
        alice request pay-db read: up to 1200s, 2 approval(s)
        alice request pay-db admin: up to 900s, 2 approval(s)
        alice request pay-db batch: up to 1200s, 2 approval(s)
        alice request pay-db write: up to 1200s, 2 approval(s)
        alice emergency pay-db read: up to 600s, 0 approval(s)
        erin request prod-db read: up to 1800s, 1 approval(s)
        erin request prod-db admin: up to 900s, 2 approval(s)
        erin request prod-db batch: up to 3600s, 1 approval(s)
        erin emergency prod-db read: up to 600s, 0 approval(s)
        erin emergency prod-db admin: up to 600s, 0 approval(s)
        erin emergency prod-db batch: up to 600s, 0 approval(s)
        erin emergency prod-db write: up to 600s, 0 approval(s)
        erin request pay-db read: up to 1200s, 2 approval(s)
        erin request pay-db admin: up to 900s, 2 approval(s)
        erin request pay-db batch: up to 1200s, 2 approval(s)
        erin request pay-db write: up to 1200s, 2 approval(s)
        erin emergency pay-db read: up to 600s, 0 approval(s)
        erin emergency pay-db admin: up to 600s, 0 approval(s)
        erin emergency pay-db batch: up to 600s, 0 approval(s)
        erin emergency pay-db write: up to 600s, 0 approval(s)
        frank request prod-db read: up to 1800s, 1 approval(s)
        frank request prod-db admin: up to 900s, 2 approval(s)
        frank request prod-db batch: up to 3600s, 1 approval(s)
        frank emergency prod-db read: up to 600s, 0 approval(s)
        frank request pay-db read: up to 1200s, 2 approval(s)
        frank request pay-db admin: up to 900s, 2 approval(s)
        frank request pay-db batch: up to 1200s, 2 approval(s)
        frank request pay-db write: up to 1200s, 2 approval(s)
        frank emergency pay-db read: up to 600s, 0 approval(s)
        drill-bot request canary-db read: up to 300s, 0 approval(s)
        drill-bot request canary-db admin: up to 300s, 0 approval(s)
        drill-bot request canary-db batch: up to 300s, 0 approval(s)
        drill-bot request canary-db write: up to 300s, 0 approval(s)
        3200 combinations, 173 allowed, 0 mismatches
    "#]]
    .assert_eq(&summary);
}

#[test]
fn a_passed_countersignature_deadline_ends_the_grant_before_any_tick() {
    // oncall-emergency-read: countersign within 2m, at most 10m. No tick
    // runs: the grant is dead at @2m all the same.
    check(
        r#"
        emergency alice prod-db read 10m "dashboards down" @0s
        live @1m59s999ms
        live @2m
        approve bob "too late" @2m
        "#,
        expect![[r#"
            emergency alice prod-db read 10m "dashboards down" @0s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
            live @1m59s999ms
              live: yes
            live @2m
              live: no
            approve bob "too late" @2m
              error: cannot approve a request that is active but past its deadline
        "#]],
    );
    // Countersigned in time: the grant lives until it expires.
    check(
        r#"
        emergency alice prod-db read 10m "dashboards down" @0s
        approve bob "seen" @1m
        live @2m
        live @9m59s999ms
        live @10m
        "#,
        expect![[r#"
            emergency alice prod-db read 10m "dashboards down" @0s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
            approve bob "seen" @1m
              request.countersigned by bob: auth_method="local" comment="seen"
              => active; emergency; activated @0s; expires @10m; countersigned by bob @1m; review required
            live @2m
              live: yes
            live @9m59s999ms
              live: yes
            live @10m
              live: no
        "#]],
    );
}

#[test]
fn emergency_self_activation_waits_for_the_countersignature_and_the_limit() {
    check(
        r#"
        emergency erin prod-db admin 10m "primary down" @0s
        # Not countersigned yet: no second grant, whatever the target or role.
        emergency erin pay-db admin 10m "and payments" @1m
        approve bob "seen" @2m
        # Countersigned, but one open emergency grant is the limit.
        emergency erin prod-db read 10m "read replica too" @3m
        revoke erin "done" @4m
        # Released, countersigned, review not yet due: allowed again.
        emergency erin prod-db read 10m "again" @5m
        "#,
        expect![[r#"
            emergency erin prod-db admin 10m "primary down" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            emergency erin pay-db admin 10m "and payments" @1m
              error: emergency access refused: emergency grant r1 is not countersigned yet: an approver from sre-leads must countersign it (breakglass approve r1), or release it (breakglass revoke r1) first
            approve bob "seen" @2m
              request.countersigned by bob: auth_method="local" comment="seen"
              => active; emergency; activated @0s; expires @10m; countersigned by bob @2m; review required
            emergency erin prod-db read 10m "read replica too" @3m
              error: emergency access refused: erin already has 1 open emergency request(s) (the oldest is r1), the most one principal may hold at once is 1: release it (breakglass revoke r1) or wait until it ends
            revoke erin "done" @4m
              request.revoked by erin: auth_method="local" end_reason="released" reason="done"
              => revoked; emergency; activated @0s; expires @10m; countersigned by bob @2m; ended @4m by erin (released); review required
            emergency erin prod-db read 10m "again" @5m
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency,oncall-emergency-read" reason="again" role="read" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@7m duration_s=600 emergency=true expires_at=@15m
              => active; emergency; activated @5m; expires @15m; countersign by @7m; review required
        "#]],
    );
    // A raised limit admits a second open grant, not a third.
    check(
        r#"
        limits 2 24h @0s
        emergency erin prod-db admin 10m "primary down" @0s
        approve bob "seen" @1m
        emergency erin prod-db read 10m "replica" @2m
        approve carol "seen" @3m
        emergency erin pay-db admin 10m "payments" @4m
        "#,
        expect![[r#"
            limits 2 24h @0s
            emergency erin prod-db admin 10m "primary down" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            approve bob "seen" @1m
              request.countersigned by bob: auth_method="local" comment="seen"
              => active; emergency; activated @0s; expires @10m; countersigned by bob @1m; review required
            emergency erin prod-db read 10m "replica" @2m
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency,oncall-emergency-read" reason="replica" role="read" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@4m duration_s=600 emergency=true expires_at=@12m
              => active; emergency; activated @2m; expires @12m; countersign by @4m; review required
            approve carol "seen" @3m
              request.countersigned by carol: auth_method="local" comment="seen"
              => active; emergency; activated @2m; expires @12m; countersigned by carol @3m; review required
            emergency erin pay-db admin 10m "payments" @4m
              error: emergency access refused: erin already has 2 open emergency request(s) (the oldest is r1), the most one principal may hold at once is 2: release it (breakglass revoke r1) or wait until it ends
        "#]],
    );
    // Other principals are not blocked by erin's grant.
    check(
        r#"
        emergency erin prod-db admin 10m "primary down" @0s
        emergency alice prod-db read 10m "dashboards" @1m
        "#,
        expect![[r#"
            emergency erin prod-db admin 10m "primary down" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            emergency alice prod-db read 10m "dashboards" @1m
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@3m duration_s=600 emergency=true expires_at=@11m
              => active; emergency; activated @1m; expires @11m; countersign by @3m; review required
        "#]],
    );
}

#[test]
fn an_uncountersigned_grant_blocks_until_it_is_reviewed() {
    check(
        r#"
        emergency alice prod-db read 10m "dashboards down" @0s
        tick @2m
        # Cut for want of a countersignature: re-opening at once would make
        # the countersignature pointless.
        emergency alice prod-db read 10m "still down" @2m1s
        switch r1 @3m
        review bob ok "outage was real" @3m
        emergency alice prod-db read 10m "still down" @3m1s
        "#,
        expect![[r#"
            emergency alice prod-db read 10m "dashboards down" @0s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
            tick @2m
              request.revoked by system: countersign_by=@2m end_reason="not_countersigned" lateness_ms=0
              => revoked; emergency; activated @0s; expires @10m; countersign by @2m; ended @2m by system (not_countersigned); review required
            emergency alice prod-db read 10m "still down" @2m1s
              error: emergency access refused: emergency grant r1 ended without the countersignature its policy asks for and is not reviewed yet: an approver from sre-leads must review it (breakglass review r1) first
            switch r1 @3m
              => revoked; emergency; activated @0s; expires @10m; countersign by @2m; ended @2m by system (not_countersigned); review required
            review bob ok "outage was real" @3m
              request.reviewed by bob: auth_method="local" notes="outage was real" outcome="ok"
              => revoked; emergency; activated @0s; expires @10m; countersign by @2m; ended @2m by system (not_countersigned); review required; reviewed Ok by bob @3m
            emergency alice prod-db read 10m "still down" @3m1s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="still down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@5m1s duration_s=600 emergency=true expires_at=@13m1s
              => active; emergency; activated @3m1s; expires @13m1s; countersign by @5m1s; review required
        "#]],
    );
    // Before the scheduler has written the revocation, the same holds.
    check(
        r#"
        emergency alice prod-db read 10m "dashboards down" @0s
        emergency alice prod-db read 10m "still down" @2m1s
        "#,
        expect![[r#"
            emergency alice prod-db read 10m "dashboards down" @0s
              request.created by alice: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="oncall-emergency-read" reason="dashboards down" role="read" target="prod-db" ticket=null
              request.activated by alice: auth_method="local" countersign_by=@2m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @2m; review required
            emergency alice prod-db read 10m "still down" @2m1s
              error: emergency access refused: emergency grant r1 ended without the countersignature its policy asks for and is not reviewed yet: an approver from sre-leads must review it (breakglass review r1) first
        "#]],
    );
    // A short grant that expires before its countersignature is due was
    // never vouched for either.
    check(
        r#"
        emergency erin prod-db admin 4m "quick fix" @0s
        tick @4m
        emergency erin prod-db admin 4m "another quick fix" @4m1s
        "#,
        expect![[r#"
            emergency erin prod-db admin 4m "quick fix" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=240 emergency=true policy="ic-emergency" reason="quick fix" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=240 emergency=true expires_at=@4m
              => active; emergency; activated @0s; expires @4m; countersign by @5m; review required
            tick @4m
              request.expired by system: expires_at=@4m lateness_ms=0
              => expired; emergency; activated @0s; expires @4m; countersign by @5m; ended @4m by system (expired); review required
            emergency erin prod-db admin 4m "another quick fix" @4m1s
              error: emergency access refused: emergency grant r1 ended without the countersignature its policy asks for and is not reviewed yet: an approver from sre-leads must review it (breakglass review r1) first
        "#]],
    );
}

#[test]
fn an_overdue_review_blocks_the_next_emergency() {
    check(
        r#"
        emergency erin prod-db admin 10m "primary down" @0s
        approve bob "seen" @1m
        tick @10m
        emergency erin prod-db admin 10m "again" @24h9m59s999ms
        switch r2 @24h9m59s999ms
        approve bob "seen" @24h10m
        revoke erin "done" @24h10m
        # r1 ended at @10m and is still not reviewed a day later.
        emergency erin prod-db admin 10m "third time" @24h10m
        switch r1 @24h11m
        review carol ok "fine" @24h11m
        emergency erin prod-db admin 10m "third time" @24h12m
        "#,
        expect![[r#"
            emergency erin prod-db admin 10m "primary down" @0s
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="primary down" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@5m duration_s=600 emergency=true expires_at=@10m
              => active; emergency; activated @0s; expires @10m; countersign by @5m; review required
            approve bob "seen" @1m
              request.countersigned by bob: auth_method="local" comment="seen"
              => active; emergency; activated @0s; expires @10m; countersigned by bob @1m; review required
            tick @10m
              request.expired by system: expires_at=@10m lateness_ms=0
              => expired; emergency; activated @0s; expires @10m; countersigned by bob @1m; ended @10m by system (expired); review required
            emergency erin prod-db admin 10m "again" @24h9m59s999ms
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="again" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@24h14m59s999ms duration_s=600 emergency=true expires_at=@24h19m59s999ms
              => active; emergency; activated @24h9m59s999ms; expires @24h19m59s999ms; countersign by @24h14m59s999ms; review required
            switch r2 @24h9m59s999ms
              => active; emergency; activated @24h9m59s999ms; expires @24h19m59s999ms; countersign by @24h14m59s999ms; review required
            approve bob "seen" @24h10m
              request.countersigned by bob: auth_method="local" comment="seen"
              => active; emergency; activated @24h9m59s999ms; expires @24h19m59s999ms; countersigned by bob @24h10m; review required
            revoke erin "done" @24h10m
              request.revoked by erin: auth_method="local" end_reason="released" reason="done"
              => revoked; emergency; activated @24h9m59s999ms; expires @24h19m59s999ms; countersigned by bob @24h10m; ended @24h10m by erin (released); review required
            emergency erin prod-db admin 10m "third time" @24h10m
              error: emergency access refused: the review of emergency grant r1 is overdue since 2027-01-16T08:10:00.000Z (emergency grants are reviewed within 24h of their end): an approver from sre-leads must review it (breakglass review r1) first
            switch r1 @24h11m
              => expired; emergency; activated @0s; expires @10m; countersigned by bob @1m; ended @10m by system (expired); review required
            review carol ok "fine" @24h11m
              request.reviewed by carol: auth_method="local" notes="fine" outcome="ok"
              => expired; emergency; activated @0s; expires @10m; countersigned by bob @1m; ended @10m by system (expired); review required; reviewed Ok by carol @24h11m
            emergency erin prod-db admin 10m "third time" @24h12m
              request.created by erin: approvals_required=0 approver_groups=["sre-leads"] auth_method="local" duration_s=600 emergency=true policy="ic-emergency" reason="third time" role="admin" target="prod-db" ticket=null
              request.activated by erin: auth_method="local" countersign_by=@24h17m duration_s=600 emergency=true expires_at=@24h22m
              => active; emergency; activated @24h12m; expires @24h22m; countersign by @24h17m; review required
        "#]],
    );
}

#[test]
fn offboarding_ends_what_is_still_open() {
    check(
        r#"
        request alice prod-db read 15m "look" @0s
        approve bob @1m
        offboard @2m
        live @2m
        offboard @3m
        review bob ok "left the company" @4m
        "#,
        expect![[r#"
            request alice prod-db read 15m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            approve bob @1m
              request.approved by bob: approvals=1 approvals_required=1 auth_method="local" comment=null
              request.activated by bob: auth_method="local" duration_s=900 emergency=false expires_at=@16m
              => active; activated @1m; expires @16m
            offboard @2m
              request.revoked by system: end_reason="principal_removed" requester="alice"
              => revoked; activated @1m; expires @16m; ended @2m by system (principal_removed)
            live @2m
              live: no
            offboard @3m
              error: cannot offboard a request that is revoked
            review bob ok "left the company" @4m
              request.reviewed by bob: auth_method="local" notes="left the company" outcome="ok"
              => revoked; activated @1m; expires @16m; ended @2m by system (principal_removed); reviewed Ok by bob @4m
        "#]],
    );
    check(
        r#"
        request alice prod-db read 15m "look" @0s
        offboard @1m
        approve bob @2m
        "#,
        expect![[r#"
            request alice prod-db read 15m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            offboard @1m
              request.cancelled by system: end_reason="principal_removed" requester="alice"
              => cancelled; ended @1m by system (principal_removed)
            approve bob @2m
              error: cannot approve a request that is cancelled
        "#]],
    );
    // Past a deadline, the deadline decides how it ended.
    check(
        r#"
        request alice prod-db read 15m "look" @0s
        offboard @30m
        tick @30m
        offboard @31m
        "#,
        expect![[r#"
            request alice prod-db read 15m "look" @0s
              request.created by alice: approvals_required=1 approver_groups=["sre-leads"] auth_method="local" duration_s=900 emergency=false policy="oncall-db-read" reason="look" role="read" target="prod-db" ticket=null
              => pending; approvals 0/1 []; pending until @30m
            offboard @30m
              error: cannot offboard a request that is pending but past its deadline
            tick @30m
              request.timed_out by system: pending_until=@30m
              => timed_out; ended @30m by system (timed_out)
            offboard @31m
              error: cannot offboard a request that is timed_out
        "#]],
    );
}
