//! Identity against real identity providers (`breakglass-testkit`'s
//! `oidc-provider` and GitHub-Actions-like issuer, run by Node.js on
//! loopback), with the real service: people log in and request and
//! approve with their ID tokens, step-up with a fresh login, key rotation
//! at the provider while the service runs, the provider stopped, and
//! workload tokens that request and wait but never approve.

mod common;

use std::time::Duration;

use breakglass_testkit::oidc::{CLIENT_ID, GithubActionsIssuer, OidcProvider};
use common::{TestServer, call, detail, totp_now, totp_principal, wait_until_identity_is};
use serde_json::json;

/// `read` needs one approver who signed in within 5 s (a short window so
/// the test can outlive it); workloads of acme/payments may ask for
/// `admin` with two approvals.
const POLICY: &str = r#"
@id("read")
@approvals("1")
@approvers("sre-leads")
@approver_fresh_auth("5s")
@max_duration("30m")
permit (principal in Group::"oncall", action == Action::"request", resource in TargetGroup::"production")
when { context.role == "read" };

@id("payments-migrate")
@approvals("2")
@approvers("sre-leads")
@max_duration("10m")
permit (principal in Group::"deployers", action == Action::"request", resource == Target::"prod-db")
when {
  principal.kind == "workload" &&
  principal.hasTag("repository") && principal.getTag("repository") == "acme/payments" &&
  context.role == "admin"
};
"#;

const AUDIENCE: &str = "breakglass";

/// `[server]` lines (a pending timeout longer than the test) and the
/// `[identity.oidc]` table for `provider`.
fn oidc(provider: &OidcProvider) -> String {
    format!(
        "pending_timeout = \"5m\"\n[identity.oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n",
        provider.issuer()
    )
}

#[test]
fn people_log_in_request_and_approve_and_step_up_with_a_fresh_login() {
    let provider = OidcProvider::start().expect("provider");
    let server = TestServer::start_with_policy(
        tempfile::tempdir().expect("tempdir"),
        &oidc(&provider),
        POLICY,
    );
    let (status, cfg) = common::call_raw(&server.url, None, "GET", "/v1/auth/config", None);
    assert_eq!(status, 200);
    assert_eq!(cfg["oidc"]["issuer"], provider.issuer());

    let alice = provider.id_token("alice").expect("alice logs in");
    let (status, me) = call(&server, &alice, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (
            me["name"].as_str(),
            me["kind"].as_str(),
            me["auth_method"].as_str()
        ),
        (Some("alice"), Some("human"), Some("oidc"))
    );
    assert_eq!(me["groups"], json!(["oncall"]));
    let (status, req) = call(
        &server,
        &alice,
        None,
        "POST",
        "/v1/requests",
        Some(
            json!({"target": "prod-db", "role": "read", "duration": "15m", "reason": "slow queries"}),
        ),
    );
    assert_eq!(status, 201, "{req}");
    let id = req["id"].as_str().expect("id").to_string();

    // bob signed in, then waited past the policy's window.
    let bob = provider.id_token("bob").expect("bob logs in");
    std::thread::sleep(Duration::from_secs(6));
    let approve = format!("/v1/requests/{id}/approve");
    let (status, body) = call(&server, &bob, None, "POST", &approve, None);
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("step_up_required")),
        "{body}"
    );
    assert!(detail(&body).contains("breakglass login --fresh"), "{body}");
    // A second login without max_age reuses the session: still stale.
    let again = provider.id_token("bob").expect("bob again");
    let (status, body) = call(&server, &again, None, "POST", &approve, None);
    assert_eq!(status, 403, "{body}");
    // `login --fresh` sends max_age=0: the provider signs bob in again.
    let fresh = provider
        .login("bob", Some(0))
        .expect("fresh login")
        .id_token;
    let (status, body) = call(&server, &fresh, None, "POST", &approve, None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active");
    assert_eq!(body["approvals"][0]["by"], "bob");
}

#[test]
fn keys_rotate_at_the_provider_and_cached_keys_outlive_it() {
    let mut provider = OidcProvider::start().expect("provider");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("{}{}", oidc(&provider), totp_principal(dir.path()));
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    wait_until_identity_is(&server, "ok");
    let before = provider.id_token("alice").expect("login");
    assert_eq!(
        call(&server, &before, None, "GET", "/v1/whoami", None).0,
        200
    );

    // A new signing key while the service runs: its first token makes the
    // service refetch the keys.
    let old_kids = provider.key_ids().expect("kids");
    provider.rotate_keys().expect("rotate");
    let after = provider.id_token("alice").expect("login after rotation");
    let kid = breakglass_testkit::oidc::jwt_header(&after).expect("header")["kid"].clone();
    assert!(!old_kids.iter().any(|k| json!(k) == kid), "a new kid signs");
    let (status, body) = call(&server, &after, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(&server, &before, None, "GET", "/v1/whoami", None).0,
        200
    );

    // The provider goes away, and the service restarts without it: the
    // keys cached in the data dir verify tokens; readiness says degraded.
    provider.stop();
    let dir = server.stop();
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    let (status, ready) = common::call_raw(&server.url, None, "GET", "/readyz", None);
    assert_eq!(
        (status, ready["identity"].as_str()),
        (200, Some("degraded")),
        "{ready}"
    );
    let (status, body) = call(&server, &after, None, "GET", "/v1/whoami", None);
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("alice")),
        "{body}"
    );

    // The local way in with TOTP needs no provider.
    let (status, body) = call(&server, "token-tina", None, "GET", "/v1/whoami", None);
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("otp_required")),
        "{body}"
    );
    let code = totp_now();
    let (status, body) = call(
        &server,
        "token-tina",
        Some(&code),
        "GET",
        "/v1/whoami",
        None,
    );
    assert_eq!(
        (status, body["auth_method"].as_str()),
        (200, Some("local+totp")),
        "{body}"
    );
}

#[test]
fn a_workload_requests_and_waits_and_never_approves() {
    let provider = OidcProvider::start().expect("provider");
    let gha = GithubActionsIssuer::start().expect("issuer");
    let extra = format!(
        "{}\n[[identity.workloads]]\nname = \"gha:{{repository}}:{{environment}}\"\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\nclaims = {{ repository_owner = \"acme\", ref = \"refs/heads/main\" }}\ngroups = [\"deployers\", \"sre-leads\"]\n",
        oidc(&provider),
        gha.issuer()
    );
    let server =
        TestServer::start_with_policy(tempfile::tempdir().expect("tempdir"), &extra, POLICY);
    let job = gha.token(AUDIENCE).expect("job token");
    let (status, me) = call(&server, &job, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["name"], "gha:acme/payments:production");
    assert_eq!(me["kind"], "workload");
    let (status, req) = call(
        &server,
        &job,
        None,
        "POST",
        "/v1/requests",
        Some(
            json!({"target": "prod-db", "role": "admin", "duration": "10m", "reason": "migration 42"}),
        ),
    );
    assert_eq!(status, 201, "{req}");
    assert_eq!(req["state"], "pending");
    let wid = req["id"].as_str().expect("id").to_string();

    // The job is in the approver group and still may not approve anything.
    let alice = provider.id_token("alice").expect("alice");
    let (status, areq) = call(
        &server,
        &alice,
        None,
        "POST",
        "/v1/requests",
        Some(json!({"target": "prod-db", "role": "read", "duration": "5m", "reason": "look"})),
    );
    assert_eq!(status, 201, "{areq}");
    let aid = areq["id"].as_str().expect("id");
    let (status, body) = call(
        &server,
        &job,
        None,
        "POST",
        &format!("/v1/requests/{aid}/approve"),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("workload_not_allowed")),
        "{body}"
    );

    // A token for another audience, or from a branch, matches no entry.
    let other = gha.token("someone-else").expect("token");
    let (status, body) = call(&server, &other, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 401, "{body}");
    assert!(
        detail(&body).contains("no workload entry matches"),
        "{body}"
    );
    gha.set_claims(json!({"ref": "refs/heads/feature"}))
        .expect("claims");
    let branch = gha.token(AUDIENCE).expect("token");
    let (status, body) = call(&server, &branch, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 401, "{body}");
    assert!(
        detail(&body).contains("claim ref = \"refs/heads/feature\" is not accepted"),
        "{body}"
    );

    // People approve; the waiting job sees its grant.
    let carol = provider.id_token("carol").expect("carol");
    let bob = provider.id_token("bob").expect("bob");
    for t in [&carol, &bob] {
        let (status, body) = call(
            &server,
            t,
            None,
            "POST",
            &format!("/v1/requests/{wid}/approve"),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call(
        &server,
        &job,
        None,
        "GET",
        &format!("/v1/requests/{wid}"),
        None,
    );
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("active")),
        "{body}"
    );
}
