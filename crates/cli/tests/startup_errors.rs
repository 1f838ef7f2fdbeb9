//! A wrong config or policy stops `breakglass serve` before it serves
//! anything: a non-zero exit and one message that names what is wrong (the
//! key, the file and line, the port). DESIGN §3, §7, §9.

mod common;

use std::time::Duration;

use common::{POLICY, Server, Setup};

/// Starts `serve` on `setup` and expects it to fail on its own; returns its
/// stderr.
#[track_caller]
fn serve_fails(setup: &Setup) -> String {
    let mut server = Server::spawn(setup);
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("serve kept running; stderr:\n{}", server.stderr()));
    let stderr = server.stderr();
    assert_eq!(status.code(), Some(1), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
    // Nothing was stored: the checks come before the store is opened.
    assert!(
        !setup.data_dir().exists(),
        "a failed start created {}",
        setup.data_dir().display()
    );
    stderr
}

/// `setup`'s config with `from` replaced by `to` (which must occur).
fn edit_config(setup: &Setup, from: &str, to: &str) {
    let text = setup.config_text();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(setup.config_path(), text.replacen(from, to, 1)).expect("write config");
}

#[test]
fn unknown_config_key_is_named() {
    let setup = Setup::new();
    edit_config(
        &setup,
        "admin_groups =",
        "listen_adress = \"x\"\nadmin_groups =",
    );
    let err = serve_fails(&setup);
    assert!(err.contains("config.toml"), "{err}");
    assert!(err.contains("unknown field `listen_adress`"), "{err}");
}

#[test]
fn bad_token_digest_is_named() {
    let setup = Setup::new();
    let alice = common::sha256_hex(common::token("alice").as_bytes());
    edit_config(&setup, &alice, "not-a-sha256");
    let err = serve_fails(&setup);
    assert!(err.contains("principals[0].token_sha256"), "{err}");
}

#[test]
fn policy_syntax_error_names_file_and_line() {
    // The first `when` line gets a typo.
    let policy = POLICY.replacen(
        "when { context.role == \"read\" };",
        "when { context.role == \"read\" &&& true };",
        1,
    );
    let line = policy
        .lines()
        .position(|l| l.contains("&&&"))
        .expect("edited line")
        + 1;
    let setup = Setup::with_policy(&policy);
    let err = serve_fails(&setup);
    assert!(
        err.contains(&format!("policy.cedar:{line}:")),
        "line {line} not named: {err}"
    );
    assert!(err.contains("invalid token"), "{err}");
}

#[test]
fn policy_without_approvals_is_refused() {
    let policy = POLICY.replacen("@approvals(\"1\")\n", "", 1);
    let setup = Setup::with_policy(&policy);
    let err = serve_fails(&setup);
    assert!(err.contains("policy.cedar:3:1:"), "{err}");
    assert!(
        err.contains("policy oncall-db-read: a permit needs @approvals(\"N\")"),
        "{err}"
    );
}

#[test]
fn policy_with_unknown_context_attribute_is_refused() {
    let policy = POLICY.replacen("context.role", "context.rol", 1);
    let line = policy
        .lines()
        .position(|l| l.contains("context.rol "))
        .expect("edited line")
        + 1;
    let setup = Setup::with_policy(&policy);
    let err = serve_fails(&setup);
    assert!(err.contains(&format!("policy.cedar:{line}:")), "{err}");
    assert!(err.contains("attribute `rol` in context"), "{err}");
    assert!(err.contains("did you mean `role`?"), "{err}");
}

#[test]
fn missing_policy_file_is_named() {
    let setup = Setup::new();
    std::fs::remove_file(setup.path().join("policy.cedar")).expect("remove policy");
    let err = serve_fails(&setup);
    let path = setup.path().join("policy.cedar");
    assert!(
        err.contains(&format!("cannot read policy file {}", path.display())),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn port_in_use_is_named() {
    let setup = Setup::new();
    // Hold the port for the duration of the test.
    let holder =
        std::net::TcpListener::bind(("127.0.0.1", setup.port)).expect("hold the server's port");
    let err = serve_fails(&setup);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{}", setup.port)),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    drop(holder);
}

#[test]
fn missing_upstream_secret_names_target_role_and_variable() {
    // An unset variable: found at start, not at `connect` while a grant's
    // clock runs.
    let setup = Setup::new();
    with_gateway_and_secret(
        &setup,
        "read",
        "bg_read",
        "password_env = \"BG_TEST_NEVER_SET\"",
    );
    let err = serve_fails(&setup);
    assert!(err.contains("password_env"), "{err}");
    assert!(err.contains("prod-db"), "{err}");
    assert!(err.contains("role read"), "{err}");
    assert!(err.contains("BG_TEST_NEVER_SET"), "{err}");

    // An unreadable file: named with the target and role.
    let setup = Setup::new();
    with_gateway_and_secret(
        &setup,
        "admin",
        "bg_admin",
        "password_file = \"no-such-secret\"",
    );
    let err = serve_fails(&setup);
    assert!(err.contains("password_file"), "{err}");
    assert!(err.contains("prod-db"), "{err}");
    assert!(err.contains("role admin"), "{err}");
    assert!(err.contains("no-such-secret"), "{err}");
}

/// `setup`'s config with a PostgreSQL gateway and `secret` on a role of
/// `prod-db` (one write: `Setup::config_text` is the generated text).
fn with_gateway_and_secret(setup: &Setup, role: &str, user: &str, secret: &str) {
    let from = format!("[targets.roles.{role}]\nuser = \"{user}\"\n");
    let text = setup.config_text();
    assert!(text.contains(&from), "{from:?} not in the config");
    let text = text.replacen(&from, &format!("{from}{secret}\n"), 1);
    std::fs::write(
        setup.config_path(),
        format!("{text}\n[gateway.postgres]\nlisten = \"127.0.0.1:1\"\n"),
    )
    .expect("write config");
}
