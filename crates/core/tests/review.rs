//! The automated review in the core (DESIGN §16): the service closes an
//! ended grant as `auto_ok` only when nothing needs a person; emergency
//! grants, `@review("always")` policies and flagged summaries are queued;
//! only the service records `auto_ok`, it never records anything else, and
//! `review.overdue` is recorded once. Each test drives the real
//! `PolicyEngine`, `lifecycle::create` and `lifecycle::step` and prints a
//! transcript as an `expect!` snapshot.

use std::fmt::Write as _;

use breakglass_core::lifecycle::{self, Command, NewRequest};
use breakglass_core::policy::{Action, PolicyEngine, PolicyInput};
use breakglass_core::{Actor, Principal, Request, ReviewOutcome, Timestamp};
use expect_test::{Expect, expect};
use serde_json::json;

const T0: i64 = 1_800_000_000_000;
const MIN: i64 = 60_000;

const POLICY: &str = r#"
@id("read-auto")
@approvals("0")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource == Target::"prod-db")
when { context.role == "read" };

@id("admin-always")
@approvals("0")
@approvers("sre-leads")
@review("always")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource == Target::"prod-db")
when { context.role == "admin" };

@id("ic-emergency")
@approvals("0")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"emergency",
        resource == Target::"prod-db");
"#;

fn at(min: i64) -> Timestamp {
    Timestamp(T0 + min * MIN)
}

fn alice() -> Principal {
    Principal::local("alice", ["oncall".to_string()].into(), false)
}

fn bob() -> Principal {
    Principal::local("bob", ["sre-leads".to_string()].into(), false)
}

/// A grant of `role` by alice at minute 0, revoked by her at minute 5.
fn ended_grant(role: &str, emergency: bool) -> Request {
    let engine = PolicyEngine::load(POLICY, "review.cedar").expect("policy loads");
    let who = alice();
    let groups: Vec<String> = who.groups.iter().cloned().collect();
    let decision = engine.evaluate(&PolicyInput {
        principal: &who.name,
        principal_groups: &groups,
        kind: who.kind,
        authn: &who.authn,
        target: "prod-db",
        target_groups: &[],
        action: if emergency {
            Action::Emergency
        } else {
            Action::Request
        },
        role,
        duration_s: 900,
        reason: "disk full",
        ticket: None,
        now: at(0),
    });
    let input = NewRequest {
        target: "prod-db".into(),
        role: role.into(),
        duration_s: 900,
        reason: "disk full".into(),
        ticket: None,
        emergency,
        drill: None,
    };
    let req = lifecycle::create(&input, &who, &decision, "r1".into(), at(0), 1800)
        .expect("created")
        .request;
    lifecycle::step(
        &req,
        &Actor::Principal(who),
        &Command::Revoke {
            reason: "done".into(),
        },
        at(5),
    )
    .expect("released")
    .request
}

fn triage(flagged: &[&str]) -> Command {
    Command::Triage {
        flagged: flagged.iter().map(|s| s.to_string()).collect(),
        findings: flagged.iter().map(|s| (s.to_string(), 1)).collect(),
        evidence: json!({"statements": {"read": 3}}),
        due_at: at(5 + 24 * 60),
    }
}

/// Runs `steps`, one line of transcript per event or refusal.
fn run(mut req: Request, steps: &[(Actor, Command, Timestamp)]) -> String {
    let mut out = String::new();
    for (actor, cmd, now) in steps {
        let who = match actor {
            Actor::System => "system".to_string(),
            Actor::Principal(p) => p.name.clone(),
        };
        match lifecycle::step(&req, actor, cmd, *now) {
            Ok(t) => {
                for e in &t.events {
                    let mut d = e.details.clone();
                    if let Some(m) = d.as_object_mut() {
                        m.remove("auth_method");
                    }
                    let _ = writeln!(out, "{} by {}: {d}", e.action, e.actor);
                }
                req = t.request;
                let _ = writeln!(
                    out,
                    "  => review {:?}, due {:?}, overdue {}, findings {:?}",
                    req.review.as_ref().map(|r| r.outcome),
                    req.review_due_at.map(|t| t.to_rfc3339()),
                    req.review_overdue,
                    req.review_findings,
                );
            }
            Err(e) => {
                let _ = writeln!(out, "{} by {who}: refused: {e}", cmd.name());
            }
        }
    }
    out
}

fn check(actual: String, expect: Expect) {
    expect.assert_eq(&actual);
}

#[test]
fn nothing_flagged_closes_as_auto_ok_once() {
    let req = ended_grant("read", false);
    assert!(lifecycle::awaits_triage(&req));
    check(
        run(
            req,
            &[
                (Actor::System, triage(&[]), at(6)),
                (Actor::System, triage(&[]), at(7)),
                // A person may still record what they found over auto_ok.
                (
                    Actor::Principal(bob()),
                    Command::Review {
                        outcome: ReviewOutcome::Misuse,
                        notes: "exported the customer table".into(),
                    },
                    at(8),
                ),
            ],
        ),
        expect![[r#"
            request.reviewed by system: {"outcome":"auto_ok","notes":"nothing in the summary needed a person","summary":{"statements":{"read":3}}}
              => review Some(AutoOk), due None, overdue false, findings {}
            triage by system: refused: this request has already been reviewed
            request.reviewed by bob: {"outcome":"misuse","notes":"exported the customer table"}
              => review Some(Misuse), due None, overdue false, findings {}
        "#]],
    );
}

#[test]
fn findings_queue_the_grant_for_a_person_and_overdue_is_recorded_once() {
    let req = ended_grant("read", false);
    check(
        run(
            req,
            &[
                (Actor::System, triage(&["finding ddl (medium)"]), at(6)),
                (Actor::System, triage(&[]), at(7)),
                (Actor::System, Command::ReviewOverdue, at(60)),
                (Actor::System, Command::ReviewOverdue, at(5 + 24 * 60)),
                (Actor::System, Command::ReviewOverdue, at(5 + 24 * 60 + 1)),
                (
                    Actor::Principal(bob()),
                    Command::Review {
                        outcome: ReviewOutcome::Ok,
                        notes: "planned migration".into(),
                    },
                    at(5 + 24 * 60 + 2),
                ),
                (Actor::System, Command::ReviewOverdue, at(5 + 24 * 60 + 3)),
            ],
        ),
        expect![[r#"
            review.queued by system: {"reasons":["finding ddl (medium)"],"due_at":"2027-01-16T08:05:00.000Z","summary":{"statements":{"read":3}}}
              => review None, due Some("2027-01-16T08:05:00.000Z"), overdue false, findings {"finding ddl (medium)": 1}
            triage by system: refused: cannot triage a request that is revoked and already queued for review
            mark overdue by system: refused: nothing is due
            review.overdue by system: {"request_id":"r1","due_at":"2027-01-16T08:05:00.000Z"}
              => review None, due Some("2027-01-16T08:05:00.000Z"), overdue true, findings {"finding ddl (medium)": 1}
            mark overdue by system: refused: nothing is due
            request.reviewed by bob: {"outcome":"ok","notes":"planned migration"}
              => review Some(Ok), due Some("2027-01-16T08:05:00.000Z"), overdue true, findings {"finding ddl (medium)": 1}
            mark overdue by system: refused: nothing is due
        "#]],
    );
}

#[test]
fn emergency_and_review_always_grants_always_go_to_a_person() {
    let emergency = ended_grant("read", true);
    let always = ended_grant("admin", false);
    assert!(
        always.review_required,
        "@review(\"always\") sets review_required"
    );
    check(
        run(emergency, &[(Actor::System, triage(&[]), at(6))])
            + &run(always, &[(Actor::System, triage(&[]), at(6))]),
        expect![[r#"
            review.queued by system: {"reasons":["emergency grant"],"due_at":"2027-01-16T08:05:00.000Z","summary":{"statements":{"read":3}}}
              => review None, due Some("2027-01-16T08:05:00.000Z"), overdue false, findings {}
            review.queued by system: {"reasons":["policy admin-always asks for review"],"due_at":"2027-01-16T08:05:00.000Z","summary":{"statements":{"read":3}}}
              => review None, due Some("2027-01-16T08:05:00.000Z"), overdue false, findings {}
        "#]],
    );
}

#[test]
fn only_the_service_records_auto_ok_and_it_records_nothing_else() {
    let req = ended_grant("read", false);
    check(
        run(
            req,
            &[
                (
                    Actor::Principal(bob()),
                    Command::Review {
                        outcome: ReviewOutcome::AutoOk,
                        notes: "looks fine".into(),
                    },
                    at(6),
                ),
                (
                    Actor::System,
                    Command::Review {
                        outcome: ReviewOutcome::Misuse,
                        notes: "flagged".into(),
                    },
                    at(6),
                ),
                (Actor::Principal(bob()), triage(&[]), at(6)),
                (Actor::Principal(bob()), Command::ReviewOverdue, at(6)),
            ],
        ),
        expect![[r#"
            review by bob: refused: invalid request: auto_ok is recorded by the service only; a person reviews with ok or misuse
            review by system: refused: invalid request: review needs a person
            triage by bob: refused: invalid request: triage is for the service only
            mark overdue by bob: refused: invalid request: mark overdue is for the service only
        "#]],
    );
}

#[test]
fn only_ended_grants_are_triaged() {
    let engine = PolicyEngine::load(POLICY, "review.cedar").expect("policy loads");
    let who = alice();
    let groups: Vec<String> = who.groups.iter().cloned().collect();
    let decision = engine.evaluate(&PolicyInput {
        principal: &who.name,
        principal_groups: &groups,
        kind: who.kind,
        authn: &who.authn,
        target: "prod-db",
        target_groups: &[],
        action: Action::Request,
        role: "read",
        duration_s: 900,
        reason: "x",
        ticket: None,
        now: at(0),
    });
    let input = NewRequest {
        target: "prod-db".into(),
        role: "read".into(),
        duration_s: 900,
        reason: "x".into(),
        ticket: None,
        emergency: false,
        drill: None,
    };
    let live = lifecycle::create(&input, &who, &decision, "r1".into(), at(0), 1800)
        .expect("created")
        .request;
    assert!(!lifecycle::awaits_triage(&live));
    check(
        run(live, &[(Actor::System, triage(&[]), at(1))]),
        expect![[r#"
            triage by system: refused: cannot triage a request that is active: only ended grants are reviewed
        "#]],
    );
}

#[test]
fn review_annotation_values_are_checked() {
    let bad = POLICY.replace("@review(\"always\")", "@review(\"sometimes\")");
    let Err(err) = PolicyEngine::load(&bad, "bad.cedar") else {
        panic!("@review(\"sometimes\") was accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("@review takes \"always\" or \"auto\""),
        "{err}"
    );
}
