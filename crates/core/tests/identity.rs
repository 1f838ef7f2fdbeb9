//! Identity in the core (DESIGN §4): workloads request and wait but never
//! approve; `@approver_fresh_auth` and `@require_mfa`; Cedar sees
//! `principal.kind`, a workload's matched claims as tags, and
//! `context.auth_method`, `auth_age_s`, `mfa`. Each test drives the real
//! `PolicyEngine`, `lifecycle::create` and `lifecycle::step` and prints a
//! transcript as an `expect!` snapshot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use breakglass_core::lifecycle::{self, Command, NewRequest};
use breakglass_core::policy::{Action, PolicyEngine, PolicyInput};
use breakglass_core::{
    Actor, AuthMethod, Authn, Principal, PrincipalKind, Request, ReviewOutcome, Timestamp,
};
use expect_test::{Expect, expect};

const T0: i64 = 1_800_000_000_000;
const MIN: i64 = 60_000;

const POLICY: &str = r#"
@id("payments-migrate")
@approvals("2")
@approvers("sre-leads")
@max_duration("10m")
permit (principal in Group::"deployers", action == Action::"request",
        resource == Target::"prod-db")
when {
  principal.kind == "workload" &&
  principal.hasTag("repository") && principal.getTag("repository") == "acme/payments" &&
  principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main" &&
  context.role == "migrate"
};

@id("fresh-approvers")
@approvals("1")
@approvers("sre-leads")
@approver_fresh_auth("10m")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource == Target::"prod-db")
when { context.role == "read" };

@id("admin-needs-mfa")
@approvals("1")
@approvers("sre-leads")
@require_mfa
@max_duration("15m")
permit (principal in Group::"oncall", action == Action::"request",
        resource == Target::"prod-db")
when { context.role == "admin" };

@id("locals-emergency-only")
forbid (principal, action == Action::"request", resource)
when { context.auth_method == "local" || context.auth_method == "local+totp" };

@id("stale-sign-in")
forbid (principal, action, resource)
when { principal.kind == "human" && context.auth_age_s > 43200 };
"#;

fn at(min: i64) -> Timestamp {
    Timestamp(T0 + min * MIN)
}

/// `who` signed in `age_min` minutes before `now` via `method`.
fn person(
    name: &str,
    groups: &[&str],
    method: AuthMethod,
    signed_in: Option<i64>,
    mfa: bool,
) -> Principal {
    let mut p = Principal::local(name, groups.iter().map(|g| g.to_string()).collect(), false);
    p.authn = Authn {
        method,
        auth_time: signed_in.map(at),
        issued_at: signed_in.map(at),
        expires_at: None,
        mfa,
        claims: BTreeMap::new(),
    };
    p.kind = match method {
        AuthMethod::Oidc => PrincipalKind::Human,
        AuthMethod::Workload => PrincipalKind::Workload,
        _ => PrincipalKind::Local,
    };
    p
}

fn workload(repository: &str, git_ref: &str) -> Principal {
    let mut p = person(
        &format!("gha:{repository}:production"),
        &["deployers", "sre-leads"],
        AuthMethod::Workload,
        None,
        false,
    );
    p.authn.claims = BTreeMap::from([
        ("repository".to_string(), repository.to_string()),
        ("ref".to_string(), git_ref.to_string()),
    ]);
    p
}

fn create(who: &Principal, role: &str, duration_s: u64, now: Timestamp) -> Result<Request, String> {
    let engine = PolicyEngine::load(POLICY, "identity.cedar").expect("policy loads");
    let groups: Vec<String> = who.groups.iter().cloned().collect();
    let decision = engine.evaluate(&PolicyInput {
        principal: &who.name,
        principal_groups: &groups,
        kind: who.kind,
        authn: &who.authn,
        target: "prod-db",
        target_groups: &[],
        action: Action::Request,
        role,
        duration_s,
        reason: "deploy",
        ticket: None,
        now,
    });
    let input = NewRequest {
        target: "prod-db".into(),
        role: role.into(),
        duration_s,
        reason: "deploy".into(),
        ticket: None,
        emergency: false,
        drill: None,
    };
    lifecycle::create(&input, who, &decision, "r1".into(), now, 1800)
        .map(|t| t.request)
        .map_err(|e| e.to_string())
}

/// Runs `steps` on `req`, one line of transcript each.
fn run(mut req: Request, steps: &[(&Principal, Command, Timestamp)]) -> String {
    let mut out = String::new();
    for (who, cmd, now) in steps {
        match lifecycle::step(&req, &Actor::Principal((*who).clone()), cmd, *now) {
            Ok(t) => {
                for e in &t.events {
                    let _ = writeln!(
                        out,
                        "{} by {} ({})",
                        e.action, e.actor, e.details["auth_method"]
                    );
                }
                req = t.request;
                let _ = writeln!(out, "  => {}", req.state);
            }
            Err(e) => {
                let _ = writeln!(out, "{} by {}: refused: {e}", cmd.name(), who.name);
            }
        }
    }
    out
}

fn check(actual: String, expect: Expect) {
    expect.assert_eq(&actual);
}

#[test]
fn a_workload_requests_and_waits_but_never_approves() {
    let ci = workload("acme/payments", "refs/heads/main");
    let other_ci = workload("acme/payments-2", "refs/heads/main");
    let bob = person("bob", &["sre-leads"], AuthMethod::Oidc, Some(-1), true);
    let carol = person("carol", &["sre-leads"], AuthMethod::Oidc, Some(-1), true);
    let req = create(&ci, "migrate", 600, at(0)).expect("the workload may request");
    assert_eq!(req.approvals_required, 2);
    let deny = Command::Deny {
        reason: "no".into(),
    };
    let approve = Command::Approve { comment: None };
    let review = Command::Review {
        outcome: ReviewOutcome::Ok,
        notes: "fine".into(),
    };
    let revoke = Command::Revoke {
        reason: "stop".into(),
    };
    check(
        run(
            req,
            &[
                (&other_ci, approve.clone(), at(1)),
                (&other_ci, deny.clone(), at(1)),
                (&bob, approve.clone(), at(2)),
                (&carol, approve.clone(), at(3)),
                (&other_ci, revoke.clone(), at(4)),
                (&ci, revoke.clone(), at(5)),
                (&other_ci, review.clone(), at(6)),
                (&bob, review, at(6)),
            ],
        ),
        expect![[r#"
            approve by gha:acme/payments-2:production: refused: gha:acme/payments-2:production is a workload: workloads may request and wait, but never approve or countersign (approvals are by people)
            deny by gha:acme/payments-2:production: refused: gha:acme/payments-2:production is a workload: workloads may request and wait, but never deny (approvals are by people)
            request.approved by bob ("oidc")
              => pending
            request.approved by carol ("oidc")
            request.activated by carol ("oidc")
              => active
            revoke by gha:acme/payments-2:production: refused: gha:acme/payments-2:production is a workload: workloads may request and wait, but never revoke another principal's grant (approvals are by people)
            request.revoked by gha:acme/payments:production ("workload")
              => revoked
            review by gha:acme/payments-2:production: refused: gha:acme/payments-2:production is a workload: workloads may request and wait, but never review (approvals are by people)
            request.reviewed by bob ("oidc")
              => revoked
        "#]],
    );
}

#[test]
fn cedar_sees_the_kind_and_the_matched_claims() {
    let lines: Vec<String> = [
        (
            "main of acme/payments",
            workload("acme/payments", "refs/heads/main"),
            "migrate",
        ),
        (
            "a branch",
            workload("acme/payments", "refs/heads/feature"),
            "migrate",
        ),
        (
            "another repository",
            workload("acme/other", "refs/heads/main"),
            "migrate",
        ),
        (
            "a person in deployers",
            person("dora", &["deployers"], AuthMethod::Oidc, Some(-1), true),
            "migrate",
        ),
        (
            "a local principal",
            person("lena", &["oncall"], AuthMethod::Local, None, false),
            "read",
        ),
        (
            "a local principal with TOTP",
            person("lena", &["oncall"], AuthMethod::LocalTotp, Some(0), true),
            "read",
        ),
        (
            "a person signed in 13h ago",
            person(
                "alice",
                &["oncall"],
                AuthMethod::Oidc,
                Some(-13 * 60),
                false,
            ),
            "read",
        ),
    ]
    .into_iter()
    .map(|(what, who, role)| match create(&who, role, 600, at(0)) {
        Ok(r) => format!("{what}: {} ({})", r.state, r.policy),
        Err(e) => format!("{what}: {e}"),
    })
    .collect();
    check(
        lines.join("\n"),
        expect![[r#"
            main of acme/payments: pending (payments-migrate)
            a branch: no policy permits this: no permit policy matches this principal, action, target and context
            another repository: no policy permits this: no permit policy matches this principal, action, target and context
            a person in deployers: no policy permits this: no permit policy matches this principal, action, target and context
            a local principal: no policy permits this: forbidden by locals-emergency-only
            a local principal with TOTP: no policy permits this: forbidden by locals-emergency-only
            a person signed in 13h ago: no policy permits this: forbidden by stale-sign-in"#]],
    );
}

#[test]
fn approvers_must_have_signed_in_recently_under_approver_fresh_auth() {
    let alice = person("alice", &["oncall"], AuthMethod::Oidc, Some(-60), false);
    let req = create(&alice, "read", 600, at(0)).expect("request");
    assert_eq!(req.approver_fresh_auth_s, Some(600));
    let stale = person("bob", &["sre-leads"], AuthMethod::Oidc, Some(-11), true);
    let unknown = person("bob", &["sre-leads"], AuthMethod::Oidc, None, true);
    let local = person("bob", &["sre-leads"], AuthMethod::Local, None, false);
    let totp = person("bob", &["sre-leads"], AuthMethod::LocalTotp, Some(0), true);
    let fresh = person("bob", &["sre-leads"], AuthMethod::Oidc, Some(-10), false);
    let approve = Command::Approve { comment: None };
    let deny = Command::Deny {
        reason: "no".into(),
    };
    check(
        run(
            req.clone(),
            &[
                (&stale, approve.clone(), at(0)),
                (&unknown, deny.clone(), at(0)),
                (&local, approve.clone(), at(0)),
                (&fresh, approve.clone(), at(0)),
            ],
        ),
        expect![[r#"
            approve by bob: refused: bob must have signed in within the last 10m to approve this request (policy @approver_fresh_auth); run `breakglass login --fresh` and try again
            deny by bob: refused: bob must have signed in within the last 10m to deny this request (policy @approver_fresh_auth); run `breakglass login --fresh` and try again
            approve by bob: refused: bob must have signed in within the last 10m to approve this request (policy @approver_fresh_auth); run `breakglass login --fresh` and try again
            request.approved by bob ("oidc")
            request.activated by bob ("oidc")
              => active
        "#]],
    );
    check(
        run(req, &[(&totp, deny, at(0))]),
        expect![[r#"
            request.denied by bob ("local+totp")
              => denied
        "#]],
    );
}

#[test]
fn require_mfa_wants_a_second_factor_of_the_requester() {
    let lines: Vec<String> = [
        (
            "password only",
            person("alice", &["oncall"], AuthMethod::Oidc, Some(-1), false),
        ),
        (
            "with a second factor",
            person("alice", &["oncall"], AuthMethod::Oidc, Some(-1), true),
        ),
    ]
    .into_iter()
    .map(|(what, who)| match create(&who, "admin", 600, at(0)) {
        Ok(r) => format!("{what}: {}", r.state),
        Err(e) => format!("{what}: {e}"),
    })
    .collect();
    check(
        lines.join("\n"),
        expect![[r#"
            password only: policy admin-needs-mfa requires a second factor (@require_mfa) and alice's sign-in shows none; run `breakglass login --fresh` and sign in with a second factor
            with a second factor: pending"#]],
    );
}

#[test]
fn the_strictest_identity_obligations_govern_when_permits_overlap() {
    let src = r#"
@id("a") @approvals("1") @approvers("leads") @max_duration("1h") @approver_fresh_auth("30m")
permit (principal, action == Action::"request", resource);
@id("b") @approvals("1") @approvers("leads") @max_duration("1h") @approver_fresh_auth("5m") @require_mfa
permit (principal, action == Action::"request", resource);
"#;
    let engine = PolicyEngine::load(src, "p.cedar").expect("loads");
    let who = person("alice", &[], AuthMethod::Oidc, Some(0), true);
    let d = engine.evaluate(&PolicyInput {
        principal: &who.name,
        principal_groups: &[],
        kind: who.kind,
        authn: &who.authn,
        target: "t",
        target_groups: &[],
        action: Action::Request,
        role: "r",
        duration_s: 60,
        reason: "x",
        ticket: None,
        now: at(0),
    });
    check(
        d.explain(),
        expect![
            "permitted by a, b: 1 approval(s) from [leads], at most 1h, approvers signed in within 5m, requester signed in with a second factor"
        ],
    );
    let bad = r#"@id("x") @approvals("0") @max_duration("1h") @approver_fresh_auth("5m")
permit (principal, action, resource);"#;
    let e = PolicyEngine::load(bad, "p.cedar").expect_err("no approvers");
    assert!(
        e.to_string()
            .contains("@approver_fresh_auth needs @approvers"),
        "{e}"
    );
    let bad = r#"@id("x") @approvals("0") @max_duration("1h") @require_mfa("yes")
permit (principal, action, resource);"#;
    let e = PolicyEngine::load(bad, "p.cedar").expect_err("bad value");
    assert!(e.to_string().contains("@require_mfa takes no value"), "{e}");
}

/// Every Cedar example of the README loads and validates against the
/// schema (with the identity attributes and annotations it shows).
#[test]
fn the_readme_policies_load() {
    let readme = include_str!("../../../README.md");
    let mut found = 0;
    for block in readme.split("```cedar").skip(1) {
        let src = block.split("```").next().unwrap_or("");
        if let Err(e) = PolicyEngine::load(src, "README.md") {
            panic!("a README policy does not load: {e}\n{src}");
        }
        found += 1;
    }
    assert!(found >= 1, "the README shows a Cedar policy");
}
