//! Identity over real sockets: the real service, and a small OpenID
//! provider on loopback that serves a discovery document and a JWKS and
//! signs tokens with keys made in the test (RSA by `openssl`, P-256 and
//! Ed25519 by ring). Covers the verifier's refusals (each 401 with its
//! reason), people requesting and approving with ID tokens, step-up,
//! workloads, key rotation, an unreachable provider (cached keys, degraded
//! readiness) and local principals with TOTP.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use breakglass_core::Timestamp;
use breakglass_server::identity::totp::Totp;
use common::{TestServer, call, detail, totp_now, totp_principal, wait_until_identity_is};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

const CLIENT_ID: &str = "breakglass-cli";
const WORKLOAD_AUDIENCE: &str = "breakglass";

const POLICY: &str = r#"
@id("read")
@approvals("1")
@approvers("sre-leads")
@approver_fresh_auth("10m")
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

// ---------------------------------------------------------------------------
// Keys and tokens
// ---------------------------------------------------------------------------

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

struct Key {
    kid: String,
    signer: Signer,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Key {
    fn rsa(kid: &str) -> Key {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rsa.der");
        let status = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER", "-out"])
            .arg(&file)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl genpkey");
        let der = std::fs::read(&file).expect("read key");
        Key {
            kid: kid.into(),
            signer: Signer::Rsa(RsaKeyPair::from_der(&der).expect("rsa key (PKCS#1 DER)")),
        }
    }

    fn ec(kid: &str) -> Key {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ec key");
        Key {
            kid: kid.into(),
            signer: Signer::Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec")),
        }
    }

    fn ed(kid: &str) -> Key {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("ed key");
        Key {
            kid: kid.into(),
            signer: Signer::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed")),
        }
    }

    fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Ed(_) => "EdDSA",
        }
    }

    fn jwk(&self) -> Value {
        match &self.signer {
            Signer::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
            Signer::Ed(k) => json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                                    "use": "sig", "x": b64(k.public_key().as_ref())}),
        }
    }

    /// A compact JWS of `claims` with this key (header `alg` and `kid` its
    /// own).
    fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match &self.signer {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .expect("rsa sign");
                sig
            }
            Signer::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .expect("ec sign")
                .as_ref()
                .to_vec(),
            Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }
}

fn now_s() -> i64 {
    Timestamp::now().millis() / 1000
}

/// An ID token's claims for `user` in `groups`, valid now, signed in
/// `signed_in_ago_s` seconds ago.
fn person(issuer: &str, user: &str, groups: &[&str], signed_in_ago_s: i64) -> Value {
    let now = now_s();
    json!({
        "iss": issuer, "aud": CLIENT_ID, "sub": format!("sub-{user}"),
        "preferred_username": user, "groups": groups,
        "iat": now, "nbf": now - 5, "exp": now + 300,
        "auth_time": now - signed_in_ago_s, "amr": ["pwd", "otp"],
    })
}

// ---------------------------------------------------------------------------
// A small OpenID provider on loopback
// ---------------------------------------------------------------------------

struct Provider {
    url: String,
    jwks: Arc<Mutex<Value>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Provider {
    fn start(keys: &[&Key]) -> Provider {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let jwks = Arc::new(Mutex::new(
            json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}),
        ));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (served, issuer) = (jwks.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                use axum::routing::get;
                let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks"),
                    "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"]});
                let app = axum::Router::new()
                    .route(
                        "/.well-known/openid-configuration",
                        get(move || async move { axum::Json(discovery) }),
                    )
                    .route(
                        "/jwks",
                        get(move || async move {
                            let v = served.lock().expect("jwks").clone();
                            axum::Json(v)
                        }),
                    );
                listener.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        Provider {
            url,
            jwks,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn publish(&self, keys: &[&Key]) {
        *self.jwks.lock().expect("jwks") =
            json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("provider thread");
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------

fn oidc_config(issuer: &str) -> String {
    format!("\n[identity.oidc]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\n")
}

fn workload_config(issuer: &str) -> String {
    format!(
        "\n[[identity.workloads]]\nname = \"gha:{{repository}}:{{environment}}\"\nissuer = \"{issuer}\"\naudience = \"{WORKLOAD_AUDIENCE}\"\nclaims = {{ repository_owner = \"acme\" }}\ngroups = [\"deployers\", \"sre-leads\"]\n"
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn id_tokens_are_verified_and_every_refusal_says_why() {
    let (rsa, ec, ed) = (Key::rsa("rsa-1"), Key::ec("ec-1"), Key::ed("ed-1"));
    let provider = Provider::start(&[&rsa, &ec, &ed]);
    let iss = provider.url.clone();
    let server = TestServer::start_with_policy(
        tempfile::tempdir().expect("tempdir"),
        &oidc_config(&iss),
        POLICY,
    );
    let (status, cfg) = common::call_raw(&server.url, None, "GET", "/v1/auth/config", None);
    assert_eq!(status, 200);
    assert_eq!(cfg["oidc"]["issuer"], iss.as_str());
    assert_eq!(cfg["oidc"]["client_id"], CLIENT_ID);
    assert_eq!(
        cfg["oidc"]["scopes"],
        json!(["openid", "profile", "offline_access", "groups"])
    );

    for key in [&rsa, &ec, &ed] {
        let (status, me) = call(
            &server,
            &key.sign(&person(&iss, "alice", &["oncall"], 60)),
            None,
            "GET",
            "/v1/whoami",
            None,
        );
        assert_eq!(status, 200, "{}: {me}", key.alg());
        assert_eq!(me["name"], "alice");
        assert_eq!(me["groups"], json!(["oncall"]));
        assert_eq!(me["kind"], "human");
        assert_eq!(me["auth_method"], "oidc");
        assert!(
            me["expires_at"].is_string() && me["auth_time"].is_string(),
            "{me}"
        );
    }
    let (status, ready) = common::call_raw(&server.url, None, "GET", "/readyz", None);
    assert_eq!(
        (status, ready["identity"].as_str()),
        (200, Some("ok")),
        "{ready}"
    );

    let good = || person(&iss, "alice", &["oncall"], 60);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good();
        f(&mut c);
        c
    };
    let now = now_s();
    let tampered = {
        let t = rsa.sign(&good());
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        parts[1] = b64(with(&|c| c["groups"] = json!(["oncall", "security"]))
            .to_string()
            .as_bytes());
        parts.join(".")
    };
    let hs256 = {
        // The RSA key's public modulus used as an HMAC secret: the classic
        // algorithm confusion.
        let Signer::Rsa(k) = &rsa.signer else {
            unreachable!()
        };
        let n = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public()).n;
        let header = json!({"alg": "HS256", "kid": "rsa-1"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(good().to_string().as_bytes())
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &n),
            input.as_bytes(),
        );
        format!("{input}.{}", b64(tag.as_ref()))
    };
    let unsigned = format!(
        "{}.{}.",
        b64(json!({"alg": "none"}).to_string().as_bytes()),
        b64(good().to_string().as_bytes())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            rsa.sign(&with(&|c| c["exp"] = json!(now - 120))),
            "token expired",
        ),
        (
            "not yet valid",
            rsa.sign(&with(&|c| c["nbf"] = json!(now + 300))),
            "token not valid before",
        ),
        (
            "issued in the future",
            ec.sign(&with(&|c| c["iat"] = json!(now + 300))),
            "issued in the future",
        ),
        (
            "wrong issuer",
            rsa.sign(&with(&|c| c["iss"] = json!("https://evil.example.com"))),
            "issuer \"https://evil.example.com\" is not configured",
        ),
        (
            "wrong audience",
            ed.sign(&with(&|c| c["aud"] = json!("another-app"))),
            "wrong audience",
        ),
        ("alg none", unsigned, "unsigned token"),
        ("RS256 key as HS256", hs256, "\"HS256\" is not allowed"),
        (
            "unknown kid",
            Key::ec("ec-404").sign(&good()),
            "signing key \"ec-404\" is unknown",
        ),
        (
            "bad azp",
            rsa.sign(&with(&|c| {
                c["aud"] = json!([CLIENT_ID, "other"]);
                c["azp"] = json!("other");
            })),
            "authorized party (azp)",
        ),
        (
            "missing azp",
            rsa.sign(&with(&|c| c["aud"] = json!([CLIENT_ID, "other"]))),
            "azp) is missing",
        ),
        (
            "missing groups",
            rsa.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("groups");
            })),
            "groups claim \"groups\" is missing",
        ),
        (
            "missing username",
            rsa.sign(&with(&|c| {
                c.as_object_mut()
                    .expect("object")
                    .remove("preferred_username");
            })),
            "claim \"preferred_username\" is missing",
        ),
        ("tampered claims", tampered, "bad signature"),
        (
            "key of another type",
            rsa.sign_with_header(&json!({"alg": "ES256", "kid": "rsa-1"}), &good()),
            "is a RSA key and cannot verify ES256",
        ),
        ("not a token at all", "a.b.c".to_string(), "malformed token"),
    ];
    let mut wrong = Vec::new();
    for (what, token, reason) in cases {
        let (status, body) = call(&server, &token, None, "GET", "/v1/whoami", None);
        if status != 401 || body["code"] != "unauthenticated" || !detail(&body).contains(reason) {
            wrong.push(format!("{what}: {status} {body}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // A JWT is never tried as a local token, and a local token still works.
    let (status, me) = common::call_raw(&server.url, Some("token-bob"), "GET", "/v1/whoami", None);
    assert_eq!(
        (status, me["kind"].as_str(), me["auth_method"].as_str()),
        (200, Some("local"), Some("local"))
    );
    assert!(me["expires_at"].is_null() && me["auth_time"].is_null());
}

#[test]
fn people_request_and_approve_with_id_tokens_and_step_up_when_policy_asks() {
    let key = Key::ec("ec-1");
    let provider = Provider::start(&[&key]);
    let iss = provider.url.clone();
    let server = TestServer::start_with_policy(
        tempfile::tempdir().expect("tempdir"),
        &oidc_config(&iss),
        POLICY,
    );
    let alice = key.sign(&person(&iss, "alice", &["oncall"], 3600));
    let (status, req) = call(
        &server,
        &alice,
        None,
        "POST",
        "/v1/requests",
        Some(json!({
        "target": "prod-db", "role": "read", "duration": "15m", "reason": "slow queries"})),
    );
    assert_eq!(status, 201, "{req}");
    let id = req["id"].as_str().expect("id").to_string();
    assert_eq!(req["approver_fresh_auth_s"], 600);

    // bob signed in 20 minutes ago: the policy wants 10.
    let stale_bob = key.sign(&person(&iss, "bob", &["sre-leads"], 20 * 60));
    let (status, body) = call(
        &server,
        &stale_bob,
        None,
        "POST",
        &format!("/v1/requests/{id}/approve"),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("step_up_required")),
        "{body}"
    );
    assert!(detail(&body).contains("breakglass login --fresh"), "{body}");
    // Self-approval stays refused whatever the token.
    let (status, body) = call(
        &server,
        &alice,
        None,
        "POST",
        &format!("/v1/requests/{id}/approve"),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("self_approval")),
        "{body}"
    );

    let fresh_bob = key.sign(&person(&iss, "bob", &["sre-leads"], 30));
    let (status, body) = call(
        &server,
        &fresh_bob,
        None,
        "POST",
        &format!("/v1/requests/{id}/approve"),
        Some(json!({"comment": "ok"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active");
    assert_eq!(body["approvals"][0]["by"], "bob");

    // Every event says how its actor authenticated.
    let (status, audit) = server.call("carol", "GET", "/v1/audit", None);
    assert_eq!(status, 200, "{audit}");
    let mine: Vec<String> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["request_id"] == id.as_str())
        .map(|e| {
            format!(
                "{} by {} ({})",
                e["action"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap_or(""),
                e["details"]["auth_method"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        mine,
        [
            "request.created by alice (oidc)",
            "request.approved by bob (oidc)",
            "request.activated by bob (oidc)"
        ]
    );
}

#[test]
fn workloads_request_and_wait_but_never_approve() {
    let people_key = Key::ed("ed-1");
    let people = Provider::start(&[&people_key]);
    let ci_key = Key::rsa("gha-1");
    let ci = Provider::start(&[&ci_key]);
    let extra = format!("{}{}", oidc_config(&people.url), workload_config(&ci.url));
    let server =
        TestServer::start_with_policy(tempfile::tempdir().expect("tempdir"), &extra, POLICY);
    let job = |repo: &str, owner: &str| {
        let now = now_s();
        ci_key.sign(&json!({
            "iss": ci.url, "aud": WORKLOAD_AUDIENCE, "sub": format!("repo:{repo}:environment:production"),
            "repository": repo, "repository_owner": owner, "environment": "production",
            "ref": "refs/heads/main", "iat": now, "nbf": now, "exp": now + 300,
        }))
    };
    let payments = job("acme/payments", "acme");
    let (status, me) = call(&server, &payments, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["name"], "gha:acme/payments:production");
    assert_eq!(
        (me["kind"].as_str(), me["auth_method"].as_str()),
        (Some("workload"), Some("workload"))
    );
    assert!(me["auth_time"].is_null());

    let (status, req) = call(
        &server,
        &payments,
        None,
        "POST",
        "/v1/requests",
        Some(json!({
        "target": "prod-db", "role": "admin", "duration": "10m", "reason": "migration 42"})),
    );
    assert_eq!(status, 201, "{req}");
    assert_eq!(
        (req["state"].as_str(), req["approvals_required"].as_u64()),
        (Some("pending"), Some(2))
    );
    let wid = req["id"].as_str().expect("id").to_string();

    // Another repository of the same owner: same entry, but policy only
    // permits acme/payments.
    let other = job("acme/website", "acme");
    let (status, body) = call(
        &server,
        &other,
        None,
        "POST",
        "/v1/requests",
        Some(json!({
        "target": "prod-db", "role": "admin", "duration": "10m", "reason": "x"})),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("policy_denied")),
        "{body}"
    );
    // A workload in the approver group still never approves.
    let (status, body) = call(
        &server,
        &other,
        None,
        "POST",
        &format!("/v1/requests/{wid}/approve"),
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("workload_not_allowed")),
        "{body}"
    );
    let (status, body) = call(
        &server,
        &other,
        None,
        "POST",
        &format!("/v1/requests/{wid}/deny"),
        Some(json!({"reason": "no"})),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("workload_not_allowed")),
        "{body}"
    );

    // Matching no entry: refused with the reason.
    let stranger = job("evil/payments", "evil");
    let (status, body) = call(&server, &stranger, None, "GET", "/v1/whoami", None);
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    assert!(detail(&body).contains("no workload entry matches this token: claim repository_owner = \"evil\" is not accepted"), "{body}");

    // No person may take a name in the workloads' name space.
    let impostor = people_key.sign(&person(&people.url, "gha:acme", &["sre-leads"], 10));
    let (status, body) = call(&server, &impostor, None, "GET", "/v1/whoami", None);
    assert_eq!(status, 401, "{body}");
    assert!(
        detail(&body).contains("is in the name space of workload names (\"gha:\")"),
        "{body}"
    );

    // People approve it.
    for (who, ago) in [("bob", 10), ("lead", 10)] {
        let t = people_key.sign(&person(&people.url, who, &["sre-leads"], ago));
        let (status, body) = call(
            &server,
            &t,
            None,
            "POST",
            &format!("/v1/requests/{wid}/approve"),
            None,
        );
        assert_eq!(status, 200, "{who}: {body}");
    }
    let (status, body) = call(
        &server,
        &payments,
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

#[test]
fn keys_rotate_and_cached_keys_outlive_the_provider() {
    let (old, new) = (Key::rsa("k-old"), Key::ec("k-new"));
    let mut provider = Provider::start(&[&old]);
    let iss = provider.url.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("{}{}", oidc_config(&iss), totp_principal(dir.path()));
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    let token = |k: &Key| k.sign(&person(&iss, "alice", &["oncall"], 60));
    // The start-up fetch, not an unknown kid, brings the first keys: the
    // refetch an unknown kid may cause (once every 30 s) is still unused.
    wait_until_identity_is(&server, "ok");
    assert_eq!(
        call(&server, &token(&old), None, "GET", "/v1/whoami", None).0,
        200
    );

    // The provider rotates: a token with the new kid makes the server
    // refetch; the retired key stops working.
    provider.publish(&[&new]);
    let (status, body) = call(&server, &token(&new), None, "GET", "/v1/whoami", None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&server, &token(&old), None, "GET", "/v1/whoami", None);
    assert_eq!(status, 401, "{body}");
    assert!(detail(&body).contains("\"k-old\" is unknown"), "{body}");

    // The provider goes away and the server restarts: the keys cached in
    // the data dir keep working, and readiness says identity is degraded.
    provider.stop();
    let dir = server.stop();
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    let (status, ready) = common::call_raw(&server.url, None, "GET", "/readyz", None);
    assert_eq!(
        (status, ready["identity"].as_str()),
        (200, Some("degraded")),
        "{ready}"
    );
    let (status, body) = call(&server, &token(&new), None, "GET", "/v1/whoami", None);
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("alice")),
        "{body}"
    );

    // The local way in, with TOTP, works without the provider.
    let (status, body) = call(&server, "token-tina", None, "GET", "/v1/whoami", None);
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("otp_required")),
        "{body}"
    );
    let (status, body) = call(
        &server,
        "token-tina",
        Some("000000x"),
        "GET",
        "/v1/whoami",
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated")),
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
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["kind"].as_str(), body["auth_method"].as_str()),
        (Some("local"), Some("local+totp"))
    );
    let (status, body) = call(
        &server,
        "token-tina",
        Some(&code),
        "GET",
        "/v1/whoami",
        None,
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    assert!(detail(&body).contains("already used"), "{body}");
    let wrong = format!(
        "{:06}",
        (code.parse::<u32>().expect("digits") + 1) % 1_000_000
    );
    let (status, body) = call(
        &server,
        "token-tina",
        Some(&wrong),
        "GET",
        "/v1/whoami",
        None,
    );
    assert_eq!(status, 401, "{body}");
}

/// Waits until at least `left_s` seconds remain in the current TOTP step,
/// so the codes a test sends all fall in one step.
fn wait_for_a_fresh_step(left_s: i64) {
    let step_ms = breakglass_server::identity::totp::STEP_S * 1000;
    let into = Timestamp::now().millis().rem_euclid(step_ms);
    if step_ms - into < left_s * 1000 {
        std::thread::sleep(Duration::from_millis((step_ms - into + 50) as u64));
    }
}

#[test]
fn wrong_codes_are_throttled_and_a_used_code_stays_used_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = totp_principal(dir.path());
    wait_for_a_fresh_step(15);
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    let t = Totp::new(b"12345678901234567890");
    let step = Totp::step_of(Timestamp::now());
    let code = format!("{:06}", t.code_at_step(step));
    let whoami = |server: &TestServer, code: &str| {
        call(server, "token-tina", Some(code), "GET", "/v1/whoami", None)
    };
    assert_eq!(whoami(&server, &code).0, 200);

    // A guesser holding the token gets a few tries per step, then none:
    // not even the right (next) code is checked until the step ends.
    let valid: Vec<String> = (step - 1..=step + 1)
        .map(|s| format!("{:06}", t.code_at_step(s)))
        .collect();
    let mut guesses = (0..1_000_000u32)
        .map(|n| format!("{n:06}"))
        .filter(|g| !valid.contains(g));
    for _ in 0..breakglass_server::identity::TOTP_WRONG_PER_STEP_MAX {
        let guess = guesses.next().expect("a wrong code");
        let (status, body) = whoami(&server, &guess);
        assert_eq!(status, 401, "{body}");
        assert!(detail(&body).contains("wrong one-time code"), "{body}");
    }
    let next = format!("{:06}", t.code_at_step(step + 1));
    let (status, body) = whoami(&server, &next);
    assert_eq!(status, 401, "{body}");
    assert!(detail(&body).contains("too many wrong"), "{body}");

    // The store remembers the used step: a restart does not make the
    // code usable again.
    let dir = server.stop();
    let server = TestServer::start_with_policy(dir, &extra, POLICY);
    let (status, body) = whoami(&server, &code);
    assert_eq!(status, 401, "{body}");
    assert!(detail(&body).contains("already used"), "{body}");
}
