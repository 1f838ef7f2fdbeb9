//! Policy files as data (DESIGN §3): a file that does not parse or validate,
//! or whose break-glass annotations are wrong, is refused with the line and
//! the reason; evaluation fails closed and is the same on every run.
//!
//! Each `check` prints the `PolicyError` and the source line it names, so a
//! wrong line number shows in the snapshot. Refresh with
//! `UPDATE_EXPECT=1 cargo test -p breakglass-core`.

use std::fmt::Write as _;

use breakglass_core::policy::{
    Action, POLICY_FILE_LEN_MAX, PolicyEngine, PolicyError, PolicyInput,
};
use breakglass_core::{Principal, PrincipalKind, Timestamp};
use expect_test::{Expect, expect};

/// A policy that loads, so each case below can break one thing at a time.
const GOOD: &str = r#"@id("oncall-db-read")
@approvals("1")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"production")
when { context.role == "read" };
"#;

fn check(src: &str, expect: Expect) {
    let out = match PolicyEngine::load(src, "policy.cedar") {
        Ok(engine) => format!("ok: {:?}\n", engine.policy_names()),
        Err(e) => {
            let mut out = format!("{e}\n");
            if let PolicyError::Invalid { line, column, .. } = &e {
                let text = src
                    .lines()
                    .nth(line - 1)
                    .unwrap_or_else(|| panic!("error names line {line}, past the end"));
                let _ = writeln!(out, "{line:>3} | {text}");
                let _ = writeln!(out, "    | {}^", " ".repeat(column - 1));
            }
            out
        }
    };
    expect.assert_eq(&out);
}

/// `GOOD` with one line replaced (1-based).
fn with_line(n: usize, text: &str) -> String {
    let mut lines: Vec<&str> = GOOD.lines().collect();
    lines[n - 1] = text;
    lines.join("\n") + "\n"
}

/// `GOOD` with one line removed (1-based).
fn without_line(n: usize) -> String {
    let mut lines: Vec<&str> = GOOD.lines().collect();
    lines.remove(n - 1);
    lines.join("\n") + "\n"
}

#[test]
fn good_policies_load() {
    check(
        GOOD,
        expect![[r#"
        ok: ["oncall-db-read"]
    "#]],
    );
    check(
        "",
        expect![[r#"
        ok: []
    "#]],
    );
    check(
        &(GOOD.to_string()
            + "\nforbid (principal, action, resource) when { context.duration_s > 3600 };\n"),
        expect![[r#"
            ok: ["oncall-db-read", "policy1"]
        "#]],
    );
    // Ten approvals is the most a policy may ask for.
    check(
        &with_line(2, r#"@approvals("10")"#),
        expect![[r#"
        ok: ["oncall-db-read"]
    "#]],
    );
    // No approvers are needed when nobody approves or countersigns.
    check(
        &with_line(2, r#"@approvals("0")"#).replace("@approvers(\"sre-leads\")\n", ""),
        expect![[r#"
            ok: ["oncall-db-read"]
        "#]],
    );
}

#[test]
fn syntax_errors_name_their_line() {
    // The mistake is in the third policy, on line 21 of the file: the line
    // number must count the policies before it.
    let src = format!(
        "{GOOD}\n{}\n{}",
        GOOD.replace("oncall-db-read", "second"),
        r#"@id("third")
@approvals("0")
@max_duration("5m")
permit (principal, action == Action::"request", resource)
when { context.role == "read" &&& true };
"#
    );
    check(
        &src,
        expect![[r#"
        policy.cedar:21:33: invalid token
         21 | when { context.role == "read" &&& true };
            |                                 ^
    "#]],
    );
    check(
        &with_line(
            5,
            "permitt (principal in Group::\"oncall\", action == Action::\"request\",",
        ),
        expect![[r#"
        policy.cedar:5:1: invalid policy effect: permitt (effect must be either `permit` or `forbid`)
          5 | permitt (principal in Group::"oncall", action == Action::"request",
            | ^
    "#]],
    );
    check(
        &with_line(7, r#"when { context.role == "read" }"#),
        expect![[r#"
        policy.cedar:7:32: unexpected end of input
          7 | when { context.role == "read" }
            |                                ^
    "#]],
    );
    check(
        &with_line(2, r#"@approvals(1)"#),
        expect![[r#"
        policy.cedar:2:12: unexpected token `1`
          2 | @approvals(1)
            |            ^
    "#]],
    );
}

#[test]
fn schema_validation_catches_typos() {
    check(
        &with_line(
            5,
            r#"permit (principal in Grop::"oncall", action == Action::"request","#,
        ),
        expect![[r#"
            policy.cedar:5:22: for policy `policy0`, unrecognized entity type `Grop` (did you mean `Group`?)
              5 | permit (principal in Grop::"oncall", action == Action::"request",
                |                      ^
        "#]],
    );
    check(
        &with_line(7, r#"when { context.rol == "read" };"#),
        expect![[r#"
        policy.cedar:7:8: for policy `policy0`, attribute `rol` in context for Action::"request" not found (did you mean `role`?)
          7 | when { context.rol == "read" };
            |        ^
    "#]],
    );
    check(
        &with_line(7, r#"when { context.duration_s == "read" };"#),
        expect![[r#"
        policy.cedar:7:8: the types Long and String are not compatible (for policy `policy0`, both operands to a `==` expression must have compatible types. Types must be exactly equal to be compatible)
          7 | when { context.duration_s == "read" };
            |        ^
    "#]],
    );
    check(
        &with_line(
            5,
            r#"permit (principal in Group::"oncall", action == Action::"requets","#,
        ),
        expect![[r#"
            policy.cedar:5:49: for policy `policy0`, unrecognized action `Action::"requets"` (did you mean `Action::"request"`?)
              5 | permit (principal in Group::"oncall", action == Action::"requets",
                |                                                 ^
        "#]],
    );
}

#[test]
fn obligations_are_checked() {
    check(
        &without_line(2),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: a permit needs @approvals("N")
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(2, r#"@approvals("two")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @approvals("two") is not a whole number
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(2, r#"@approvals("-1")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @approvals("-1") is not a whole number
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(2, r#"@approvals("11")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @approvals(11) is more than the maximum of 10
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &without_line(4),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: a permit needs @max_duration("15m")
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(4, r#"@max_duration("30")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @max_duration: invalid duration "30": expected a number and a unit, like 90s, 15m or 1h
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(4, r#"@max_duration("forever")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @max_duration: invalid duration "forever": expected a number and a unit, like 90s, 15m or 1h
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(4, r#"@max_duration("0m")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @max_duration: duration "0m" must be positive
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(4, r#"@max_duration("8d")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @max_duration: duration "8d" is longer than the maximum of 604800s
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(4, r#"@max_duration("30m") @require_ticket("^INC-[0-9+$")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: @require_ticket is not a valid pattern: regex parse error:
                ^INC-[0-9+$
                     ^
            error: unclosed character class
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
    check(
        &with_line(4, r#"@max_duration("30m") @countersign_within("soon")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: @countersign_within: invalid duration "soon": expected a number and a unit, like 90s, 15m or 1h
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
    check(
        &without_line(3),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @approvers("group,...") is required when approvals or a countersignature are needed
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    check(
        &with_line(3, r#"@approvers(" , ")"#),
        expect![[r#"
        policy.cedar:1:1: policy oncall-db-read: @approvers("group,...") is required when approvals or a countersignature are needed
          1 | @id("oncall-db-read")
            | ^
    "#]],
    );
    // A countersignature needs someone to give it, even with no approvals.
    check(
        &with_line(2, r#"@approvals("0") @countersign_within("10m")"#)
            .replace("@approvers(\"sre-leads\")\n", ""),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: @approvers("group,...") is required when approvals or a countersignature are needed
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
}

#[test]
fn unknown_annotations_are_typos() {
    check(
        &with_line(2, r#"@aprovals("1")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: unknown annotation @aprovals (known: id, approvals, approvers, max_duration, require_ticket, countersign_within, approver_fresh_auth, require_mfa, review)
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
    check(
        &with_line(4, r#"@max_duration("30m") @ticket("INC-1")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: unknown annotation @ticket (known: id, approvals, approvers, max_duration, require_ticket, countersign_within, approver_fresh_auth, require_mfa, review)
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
}

#[test]
fn forbid_policies_carry_no_obligations() {
    let src = format!(
        "{GOOD}\n@id(\"no-long-grants\")\n@approvals(\"2\")\nforbid (principal, action, resource) when {{ context.duration_s > 3600 }};\n"
    );
    check(
        &src,
        expect![[r#"
        policy.cedar:9:1: policy no-long-grants: @approvals has no meaning on a forbid policy
          9 | @id("no-long-grants")
            | ^
    "#]],
    );
    let src = format!(
        "{GOOD}\n@id(\"no-long-grants\")\n@max_duration(\"1h\")\nforbid (principal, action, resource);\n"
    );
    check(
        &src,
        expect![[r#"
        policy.cedar:9:1: policy no-long-grants: @max_duration has no meaning on a forbid policy
          9 | @id("no-long-grants")
            | ^
    "#]],
    );
}

#[test]
fn policy_ids_are_unique() {
    check(
        &format!("{GOOD}\n{GOOD}"),
        expect![[r#"
        policy.cedar:9:1: duplicate policy @id("oncall-db-read")
          9 | @id("oncall-db-read")
            | ^
    "#]],
    );
}

#[test]
fn templates_and_huge_files_are_refused() {
    check(
        &with_line(
            5,
            r#"permit (principal == ?principal, action == Action::"request","#,
        ),
        expect![[r#"
            policy.cedar: policy templates are not supported
        "#]],
    );
    let huge = format!("{GOOD}{}", " ".repeat(POLICY_FILE_LEN_MAX));
    check(
        &huge,
        expect![[r#"
        policy.cedar: policy file is 1048806 bytes, the limit is 1048576
    "#]],
    );
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

fn input<'a>(
    principal_groups: &'a [String],
    target_groups: &'a [String],
    role: &'a str,
    duration_s: u64,
) -> PolicyInput<'a> {
    PolicyInput {
        principal: "alice",
        principal_groups,
        kind: PrincipalKind::Local,
        authn: &breakglass_core::model::LOCAL_AUTHN,
        target: "pay-db",
        target_groups,
        action: Action::Request,
        role,
        duration_s,
        reason: "because",
        ticket: None,
        now: Timestamp(1_800_000_000_000),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn explain(src: &str, role: &str, duration_s: u64) -> String {
    let engine = PolicyEngine::load(src, "policy.cedar").expect("test policy loads");
    let groups = strings(&["oncall"]);
    let targets = strings(&["production", "payments"]);
    let d = engine.evaluate(&input(&groups, &targets, role, duration_s));
    format!(
        "allowed={} governing={:?}: {}",
        d.allowed,
        d.governing,
        d.explain()
    )
}

/// Cedar skips a policy that errors; breakglass denies (DESIGN §3).
#[test]
fn evaluation_errors_deny() {
    // Overflows for any positive duration.
    let overflow = "context.duration_s * 9223372036854775807 > 0";
    let erroring_forbid = format!(
        "{GOOD}\n@id(\"broken-forbid\")\nforbid (principal, action, resource) when {{ {overflow} }};\n"
    );
    let erroring_permit = format!(
        "{GOOD}\n@id(\"broken-permit\")\n@approvals(\"0\")\n@max_duration(\"1h\")\npermit (principal, action, resource) when {{ {overflow} }};\n"
    );
    let out = [
        explain(GOOD, "read", 600),
        explain(&erroring_forbid, "read", 600),
        explain(&erroring_permit, "read", 600),
        explain(&erroring_permit, "write", 600),
    ]
    .join("\n");
    expect![[r#"
        allowed=true governing=["oncall-db-read"]: permitted by oncall-db-read: 1 approval(s) from [sre-leads], at most 30m
        allowed=false governing=[]: denied because a policy failed to evaluate (fail closed): policy broken-forbid: integer overflow while attempting to multiply the values `600` and `9223372036854775807`
        allowed=false governing=[]: denied because a policy failed to evaluate (fail closed): policy broken-permit: integer overflow while attempting to multiply the values `600` and `9223372036854775807`
        allowed=false governing=[]: denied because a policy failed to evaluate (fail closed): policy broken-permit: integer overflow while attempting to multiply the values `600` and `9223372036854775807`"#]].assert_eq(&out);
}

/// Cedar hands back its reasons as a set; the governing policies, and so the
/// stored `policy` field and every message, must not depend on its order.
#[test]
fn evaluation_is_deterministic() {
    let src = format!(
        "{GOOD}\n{}",
        r#"@id("payments")
@approvals("2")
@approvers("payments-leads")
@max_duration("20m")
@require_ticket("^PAY-")
permit (principal in Group::"oncall", action == Action::"request",
        resource in TargetGroup::"payments");

@id("a-first-by-name")
@approvals("1")
@approvers("dbas")
@max_duration("25m")
@require_ticket("^[A-Z]+-[0-9]+$")
permit (principal, action, resource in TargetGroup::"payments");
"#
    );
    let engine = PolicyEngine::load(&src, "policy.cedar").expect("test policy loads");
    let groups = strings(&["oncall"]);
    let targets = strings(&["production", "payments"]);
    let first = engine.evaluate(&input(&groups, &targets, "read", 600));
    let ob = first.obligations.as_ref().expect("permitted");
    let first_ticket_error = ob.check_ticket(Some("nope"));
    for _ in 0..64 {
        let d = engine.evaluate(&input(&groups, &targets, "read", 600));
        assert_eq!(d.governing, first.governing);
        assert_eq!(d.explain(), first.explain());
        let ob = d.obligations.as_ref().expect("permitted");
        assert_eq!(ob.check_ticket(Some("nope")), first_ticket_error);
    }
    expect![[r#"
        permitted by a-first-by-name, oncall-db-read, payments: 2 approval(s) from [dbas, payments-leads, sre-leads], at most 20m, ticket matching ^[A-Z]+-[0-9]+$, ticket matching ^PAY-
        Err("ticket \"nope\" does not match ^[A-Z]+-[0-9]+$ required by policy a-first-by-name")
    "#]].assert_eq(&format!(
        "{}\n{:?}\n",
        first.explain(),
        first_ticket_error
    ));
}

#[test]
fn a_countersignature_window_must_end_before_the_grant() {
    check(
        &with_line(4, r#"@max_duration("10m") @countersign_within("10m")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: @countersign_within("10m") must be shorter than @max_duration("10m"): a countersignature due when the grant ends anyway cuts nothing
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
    check(
        &with_line(4, r#"@max_duration("10m") @countersign_within("1h")"#),
        expect![[r#"
            policy.cedar:1:1: policy oncall-db-read: @countersign_within("1h") must be shorter than @max_duration("10m"): a countersignature due when the grant ends anyway cuts nothing
              1 | @id("oncall-db-read")
                | ^
        "#]],
    );
    check(
        &with_line(4, r#"@max_duration("10m") @countersign_within("9m59s")"#),
        expect![[r#"
            ok: ["oncall-db-read"]
        "#]],
    );
}

/// The warnings of `src` for principals given as (name, groups).
fn warnings(src: &str, principals: &[(&str, &[&str])]) -> String {
    let engine = PolicyEngine::load(src, "policy.cedar").expect("policy loads");
    let principals: Vec<Principal> = principals
        .iter()
        .map(|(name, groups)| {
            Principal::local(*name, groups.iter().map(|g| g.to_string()).collect(), false)
        })
        .collect();
    let mut out = String::new();
    for w in engine.warnings(&principals) {
        let _ = writeln!(out, "{w}");
    }
    out
}

const UNSATISFIABLE: &str = r#"
@id("nobody-approves")
@approvals("1")
@approvers("ghosts")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource);

@id("too-many")
@approvals("3")
@approvers("sre-leads,security")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource);

@id("leads-ask-leads")
@approvals("2")
@approvers("sre-leads")
@max_duration("30m")
permit (principal in Group::"sre-leads", action == Action::"request", resource);

@id("anyone-asks")
@approvals("2")
@approvers("sre-leads")
@max_duration("30m")
permit (principal, action == Action::"request", resource);

@id("lonely-countersigner")
@approvals("0")
@approvers("security")
@countersign_within("5m")
@max_duration("10m")
permit (principal == User::"dave", action == Action::"emergency", resource);

@id("fine")
@approvals("1")
@approvers("sre-leads")
@countersign_within("5m")
@max_duration("10m")
permit (principal in Group::"oncall", action == Action::"request", resource);

@id("self-service")
@approvals("0")
@max_duration("10m")
permit (principal in Group::"oncall", action == Action::"request", resource);
"#;

#[test]
fn rules_nobody_can_satisfy_are_named() {
    let people: &[(&str, &[&str])] = &[
        ("alice", &["oncall"]),
        ("bob", &["sre-leads"]),
        ("frank", &["sre-leads", "oncall"]),
        ("dave", &["security"]),
    ];
    expect![[r#"
        policy nobody-approves: approver group ghosts has no known member
        policy nobody-approves: @approvals("1") needs 1 eligible approver(s) but only 0 known principal(s) are in its approver groups (ghosts): every request it governs can never be approved
        policy too-many: @approvals("3") needs 3 eligible approver(s) other than the requester, 3 known principal(s) are in its approver groups (security, sre-leads) and frank could be the requester: a request by them can never be approved
        policy leads-ask-leads: @approvals("2") needs 2 eligible approver(s) other than the requester, 2 known principal(s) are in its approver groups (sre-leads) and every eligible approver could be the requester: a request by them can never be approved
        policy anyone-asks: @approvals("2") needs 2 eligible approver(s) other than the requester, 2 known principal(s) are in its approver groups (sre-leads) and every eligible approver could be the requester: a request by them can never be approved
        policy lonely-countersigner: a countersignature needs 1 eligible approver(s) other than the requester, 1 known principal(s) are in its approver groups (security) and every eligible approver could be the requester: a request by them is always cut at its countersignature deadline
    "#]].assert_eq(&warnings(UNSATISFIABLE, people));
    // With enough people every rule can be met.
    let more: &[(&str, &[&str])] = &[
        ("alice", &["oncall"]),
        ("bob", &["sre-leads"]),
        ("carol", &["sre-leads"]),
        ("frank", &["sre-leads", "oncall"]),
        ("dave", &["security"]),
        ("sec2", &["security"]),
        ("ghost", &["ghosts"]),
    ];
    expect![[r#""#]].assert_eq(&warnings(UNSATISFIABLE, more));
    expect![[r#"
        policy oncall-db-read: approver group sre-leads has no known member
        policy oncall-db-read: @approvals("1") needs 1 eligible approver(s) but only 0 known principal(s) are in its approver groups (sre-leads): every request it governs can never be approved
    "#]].assert_eq(&warnings(GOOD, &[]));
}
