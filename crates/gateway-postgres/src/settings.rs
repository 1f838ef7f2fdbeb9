//! Which session settings a client may bring in its start-up packet.
//!
//! Every start-up parameter other than `user`, `database`, `replication` and
//! `options` becomes a session setting of the upstream backend, applied
//! before the first statement and invisible in any statement text. So only
//! settings that change formatting, name lookup or the session's own
//! timeouts pass ([`SETTINGS_ALLOWED`]); every other one refuses the
//! connection with a message naming it (fail closed: a dropped setting
//! would make the client behave differently without saying why). The
//! settings that pass are recorded in the session header, in the order
//! they are forwarded.
//!
//! The `options` parameter carries command-line switches for the backend,
//! split on unescaped white space with libpq's backslash escaping:
//! `-c name=value`, `-cname=value` and `--name=value` (dashes in `name`
//! mean underscores, as in PostgreSQL). Those settings are checked against
//! the same list and forwarded as start-up parameters; any other switch
//! (`-d`, `-P`, ...) refuses the connection.

/// Settings a client may choose at start-up, compared case-insensitively.
/// They format values (`DateStyle`, `TimeZone`, `IntervalStyle`,
/// `extra_float_digits`, `bytea_output`, `lc_*`, `client_encoding`), label
/// the session (`application_name`), choose where unqualified names are
/// looked up (`search_path`: the resolved names are the ones in the
/// recorded text, read with the recorded path) or bound the session's own
/// waits (the `*_timeout`s). None of them widens what the role may do;
/// every one of them can also be changed with SQL `SET`, which is recorded
/// as a statement. Drivers set exactly these (pgjdbc, node-postgres,
/// Npgsql, asyncpg, libpq's `PGOPTIONS`).
pub const SETTINGS_ALLOWED: [&str; 16] = [
    "application_name",
    "bytea_output",
    "client_encoding",
    "client_min_messages",
    "DateStyle",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "IntervalStyle",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "lock_timeout",
    "search_path",
    "statement_timeout",
    "TimeZone",
];

/// Start-up parameters the gateway itself consumes (never forwarded as
/// settings).
const GATEWAY_PARAMS: [&str; 4] = ["user", "database", "replication", "options"];

/// Switches in one `options` value at most.
const OPTIONS_SWITCHES_MAX: usize = 64;

/// What a start-up packet asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Settings to forward, in order: those of `options` first, then the
    /// other parameters (PostgreSQL applies them in this order, so a
    /// parameter overrides the same setting in `options`).
    pub forwarded: Vec<(String, String)>,
    /// The `options` value as sent, when there was one.
    pub options: Option<String>,
}

fn allowed(name: &str) -> bool {
    SETTINGS_ALLOWED
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name))
}

/// Splits an `options` value like PostgreSQL's `pg_split_opts`: white space
/// separates words unless escaped with a backslash, which escapes any
/// character.
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut word = String::new();
        let mut escaped = false;
        while let Some(&c) = chars.peek() {
            if c.is_ascii_whitespace() && !escaped {
                break;
            }
            chars.next();
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// The settings of an `options` value, or the words that are not
/// acceptable settings.
fn parse_options(s: &str) -> Result<Vec<(String, String)>, Vec<String>> {
    let words = split_options(s);
    let mut settings = Vec::new();
    let mut bad = Vec::new();
    let mut it = words.into_iter();
    while let Some(word) = it.next() {
        let setting = if let Some(long) = word.strip_prefix("--") {
            Some(long.to_string())
        } else if word == "-c" {
            it.next()
        } else {
            word.strip_prefix("-c").map(str::to_string)
        };
        match setting.as_deref().and_then(|s| s.split_once('=')) {
            Some((name, value)) if !name.is_empty() => {
                let name = name.replace('-', "_");
                if allowed(&name) {
                    settings.push((name, value.to_string()));
                } else {
                    bad.push(name);
                }
            }
            _ => bad.push(match setting {
                Some(s) if !word.starts_with("--") => format!("{word} {s}"),
                _ => word,
            }),
        }
    }
    if bad.is_empty() {
        Ok(settings)
    } else {
        Err(bad)
    }
}

/// Checks a start-up packet's parameters; the error says which settings
/// are refused and what is allowed.
pub fn check(params: &[(String, String)]) -> Result<Startup, String> {
    let options = params
        .iter()
        .find(|(k, _)| k == "options")
        .map(|(_, v)| v.clone());
    // `options` first, whichever position it had in the packet.
    let mut forwarded = match &options {
        None => Vec::new(),
        Some(v) if split_options(v).len() > OPTIONS_SWITCHES_MAX => {
            return Err(format!(
                "breakglass gateway: more than {OPTIONS_SWITCHES_MAX} words in the \"options\" start-up parameter"
            ));
        }
        Some(v) => parse_options(v).map_err(|bad| {
            format!(
                "breakglass gateway: the \"options\" start-up parameter may only set {}; refused: {}",
                SETTINGS_ALLOWED.join(", "),
                bad.join(", ")
            )
        })?,
    };
    let mut refused: Vec<&str> = Vec::new();
    for (k, v) in params {
        if GATEWAY_PARAMS.contains(&k.as_str()) {
            continue;
        }
        if allowed(k) {
            forwarded.push((k.clone(), v.clone()));
        } else {
            refused.push(k);
        }
    }
    if !refused.is_empty() {
        return Err(format!(
            "breakglass gateway: start-up parameter(s) not allowed: {} (allowed: {}); set them with SQL SET after connecting, where they are recorded",
            refused.join(", "),
            SETTINGS_ALLOWED.join(", ")
        ));
    }
    Ok(Startup { forwarded, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_are_split_like_libpq_escapes_them() {
        assert_eq!(
            split_options("  -c a=b\\ c   --x-y=\\\\z -c\tq=1 "),
            vec!["-c", "a=b c", "--x-y=\\z", "-c", "q=1"]
        );
        assert_eq!(split_options(""), Vec::<String>::new());
    }

    #[test]
    fn allowed_settings_pass_in_postgres_order() {
        let s = check(&p(&[
            ("user", "alice"),
            ("database", "pg"),
            ("application_name", "psql"),
            (
                "options",
                "-c statement_timeout=5s -csearch_path=a,\\ b --lock-timeout=1s",
            ),
            ("DateStyle", "ISO, MDY"),
        ]))
        .expect("allowed");
        assert_eq!(
            s.forwarded,
            p(&[
                ("statement_timeout", "5s"),
                ("search_path", "a, b"),
                ("lock_timeout", "1s"),
                ("application_name", "psql"),
                ("DateStyle", "ISO, MDY"),
            ])
        );
        assert!(s.options.is_some());
    }

    #[test]
    fn other_settings_and_switches_are_refused_by_name() {
        let e = check(&p(&[
            ("user", "a"),
            ("default_transaction_read_only", "off"),
            ("row_security", "off"),
        ]))
        .expect_err("refused");
        assert!(
            e.contains("not allowed: default_transaction_read_only, row_security"),
            "{e}"
        );
        for (options, named) in [
            (
                "-c session_replication_role=replica",
                "session_replication_role",
            ),
            (
                "--session-replication-role=replica",
                "session_replication_role",
            ),
            ("-c statement_timeout=1s -P", "-P"),
            ("-d 5", "-d"),
            ("-c", "-c"),
            ("-c novalue", "-c novalue"),
        ] {
            let e = check(&p(&[("user", "a"), ("options", options)])).expect_err(options);
            assert!(e.contains(&format!("refused: {named}")), "{options}: {e}");
        }
    }
}
