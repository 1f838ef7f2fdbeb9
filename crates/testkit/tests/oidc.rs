//! The test identity providers work: discovery, a device login through the
//! real pages yields an ID token with `groups`, `auth_time` and `amr`,
//! `max_age=0` forces a new login, keys rotate, a restart keeps refresh
//! tokens, and the GitHub-Actions-like issuer signs the documented claims.

use std::time::Duration;

use breakglass_testkit::oidc::{
    self, CLIENT_ID, GithubActionsIssuer, OidcProvider, encode_form, jwt_claims, jwt_header,
};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .build()
        .into()
}

fn get_json(url: &str) -> serde_json::Value {
    let mut resp = agent().get(url).call().expect("GET");
    assert_eq!(resp.status(), 200, "{url}");
    serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("JSON")
}

fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let mut resp = agent()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(encode_form(form))
        .expect("POST");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).expect("JSON"))
}

/// A device login as a client does it: authorize, a person completes the
/// pages, then the token endpoint answers.
fn device_login(op: &OidcProvider, user: &str, extra: &[(&str, &str)]) -> serde_json::Value {
    let scope = oidc::SCOPES.join(" ");
    let mut form = vec![("client_id", CLIENT_ID), ("scope", scope.as_str())];
    form.extend_from_slice(extra);
    let (status, auth) = post_form(&format!("{}/device/auth", op.issuer()), &form);
    assert_eq!(status, 200, "{auth}");
    assert_eq!(auth["interval"], 1, "the harness shortens the interval");
    let device_code = auth["device_code"]
        .as_str()
        .expect("device_code")
        .to_owned();
    let token_form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", device_code.as_str()),
        ("client_id", CLIENT_ID),
    ];
    let (status, pending) = post_form(&format!("{}/token", op.issuer()), &token_form);
    assert_eq!(
        (status, pending["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    let u = oidc::user(user).expect("user");
    op.complete_device_login(
        auth["user_code"].as_str().expect("user_code"),
        u.name,
        u.password,
    )
    .expect("device login");
    let (status, tokens) = post_form(&format!("{}/token", op.issuer()), &token_form);
    assert_eq!(status, 200, "{tokens}");
    tokens
}

#[test]
fn device_login_yields_an_id_token_with_groups_auth_time_and_amr() {
    let op = OidcProvider::start().expect("start provider");
    let discovery = get_json(&format!("{}/.well-known/openid-configuration", op.issuer()));
    assert_eq!(discovery["issuer"], op.issuer());
    assert!(discovery["device_authorization_endpoint"].is_string());
    let jwks = get_json(discovery["jwks_uri"].as_str().expect("jwks_uri"));
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "the JWKS publishes no private key"
    );

    let tokens = device_login(&op, "alice", &[]);
    let claims = jwt_claims(tokens["id_token"].as_str().expect("id_token")).expect("claims");
    assert_eq!(claims["iss"], op.issuer());
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["preferred_username"], "alice");
    assert_eq!(claims["groups"], serde_json::json!(["oncall"]));
    assert_eq!(claims["amr"], serde_json::json!(["pwd"]));
    let auth_time = claims["auth_time"].as_i64().expect("auth_time");
    assert!(tokens["refresh_token"].is_string(), "{tokens}");

    // A wrong password is refused by the page.
    let (status, auth) = post_form(
        &format!("{}/device/auth", op.issuer()),
        &[("client_id", CLIENT_ID), ("scope", "openid")],
    );
    assert_eq!(status, 200);
    let err = op
        .complete_device_login(auth["user_code"].as_str().expect("code"), "bob", "nope")
        .expect_err("wrong password");
    assert!(
        format!("{err:#}").contains("refused the password"),
        "{err:#}"
    );

    // Carol logs in with MFA.
    let carol = jwt_claims(op.id_token("carol").expect("carol").as_str()).expect("claims");
    assert_eq!(carol["amr"], serde_json::json!(["pwd", "mfa"]));
    assert_eq!(carol["groups"], serde_json::json!(["sre-leads"]));

    // Alice's session is reused (same auth_time) unless max_age=0.
    std::thread::sleep(Duration::from_millis(1100));
    let again = jwt_claims(&op.id_token("alice").expect("alice")).expect("claims");
    assert_eq!(again["auth_time"].as_i64(), Some(auth_time));
    let fresh = device_login(&op, "alice", &[("max_age", "0")]);
    let fresh = jwt_claims(fresh["id_token"].as_str().expect("id_token")).expect("claims");
    assert!(
        fresh["auth_time"].as_i64().expect("auth_time") > auth_time,
        "{fresh}"
    );
}

#[test]
fn keys_rotate_and_restart_keeps_refresh_tokens() {
    let mut op = OidcProvider::start_with(oidc::OidcOptions {
        id_token_ttl: Duration::from_secs(2),
        ..Default::default()
    })
    .expect("start provider");
    let tokens = op
        .login("bob", None)
        .unwrap_or_else(|e| panic!("login: {e:#}\n{}", op.log()));
    let old_kid = jwt_header(&tokens.id_token).expect("header")["kid"].clone();
    let claims = jwt_claims(&tokens.id_token).expect("claims");
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        2
    );

    op.rotate_keys().expect("rotate");
    let kids = op.key_ids().expect("kids");
    assert_eq!(kids.len(), 2);
    assert_eq!(Some(kids[1].as_str()), old_kid.as_str());
    let jwks = get_json(&format!("{}/jwks", op.issuer()));
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(2));

    // The refresh token from before the restart still works, and the new
    // ID token is signed with the new key.
    let refresh = tokens.refresh_token.expect("refresh token");
    let (status, body) = post_form(
        &format!("{}/token", op.issuer()),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("client_id", CLIENT_ID),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let id_token = body["id_token"].as_str().expect("id_token");
    assert_eq!(
        jwt_header(id_token).expect("header")["kid"].as_str(),
        Some(kids[0].as_str())
    );
    assert_eq!(
        jwt_claims(id_token).expect("claims")["groups"],
        serde_json::json!(["sre-leads"])
    );

    op.stop();
    assert!(
        agent().get(format!("{}/jwks", op.issuer())).call().is_err(),
        "stopped"
    );
    op.restart().expect("restart");
    assert_eq!(
        op.key_ids().expect("kids"),
        kids,
        "a restart keeps the keys"
    );
    get_json(&format!("{}/jwks", op.issuer()));
}

#[test]
fn github_issuer_signs_the_documented_claims() {
    let gha = GithubActionsIssuer::start().expect("start issuer");
    let discovery = get_json(&format!(
        "{}/.well-known/openid-configuration",
        gha.issuer()
    ));
    assert_eq!(discovery["issuer"], gha.issuer());
    let jwks = get_json(discovery["jwks_uri"].as_str().expect("jwks_uri"));
    let kid = jwks["keys"][0]["kid"].clone();

    let token = gha.token("breakglass").expect("token");
    assert_eq!(jwt_header(&token).expect("header")["kid"], kid);
    assert_eq!(jwt_header(&token).expect("header")["alg"], "RS256");
    let claims = jwt_claims(&token).expect("claims");
    assert_eq!(claims["aud"], "breakglass");
    assert_eq!(claims["iss"], gha.issuer());
    assert_eq!(claims["repository"], "acme/payments");
    assert_eq!(claims["sub"], "repo:acme/payments:environment:production");
    for claim in [
        "ref",
        "environment",
        "job_workflow_ref",
        "sha",
        "workflow",
        "actor",
        "run_id",
    ] {
        assert!(claims[claim].is_string(), "{claim} in {claims}");
    }

    gha.set_claims(serde_json::json!({"environment": "staging", "actor": null}))
        .expect("set claims");
    let claims = jwt_claims(&gha.token("x").expect("token")).expect("claims");
    assert_eq!(claims["environment"], "staging");
    assert!(claims.get("actor").is_none());

    // The request token is checked.
    let resp = agent()
        .get(format!("{}&audience=x", gha.request_url()))
        .header("authorization", "Bearer wrong")
        .call()
        .expect("GET");
    assert_eq!(resp.status(), 401);
}
