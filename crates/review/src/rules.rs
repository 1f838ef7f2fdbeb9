//! Review rules (`[[review.rules]]`): which statements and commands deserve
//! a person's eyes, and how much.
//!
//! A rule matches a statement when every condition it sets holds: its
//! `class` (a [`Class`] or a [`Tag`] name), its `pattern` (a
//! case-insensitive substring of the normalised statement or command line),
//! and its thresholds on the rows the statement affected or returned and
//! the bytes it sent. The built-in defaults ([`RuleSet::defaults`]) encode
//! DESIGN §16 and can be switched off (`review.default_rules = false`);
//! configured rules are added to them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Class, Classified, Tag};

/// Configured rules at most.
pub const RULES_MAX: usize = 256;
/// Bytes of a rule's name or pattern at most.
pub const RULE_TEXT_LEN_MAX: usize = 256;
/// Rows a read may return before the default rule calls it a large export.
pub const EXPORT_ROWS_MIN: u64 = 10_000;
/// Bytes a statement may send before the default rule calls it a large export.
pub const EXPORT_BYTES_MIN: u64 = 64 << 20;

/// How much a finding matters. A grant with a finding at or above
/// `review.flag_severity` needs a person.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule matches on besides text and thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matcher {
    Class(Class),
    Tag(Tag),
}

/// One rule, as configured (`[[review.rules]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the finding (`ddl`, `delete_without_where`, your own).
    pub name: String,
    /// A statement class (`read`, `write`, `ddl`, `privilege`,
    /// `transaction`, `session`, `utility`, `unparsable`, `command`) or a
    /// fact (`delete_without_where`, `update_without_where`, `truncate`,
    /// `copy_to`, `copy_program`, `fastpath`, `role_setting`, `role_switch`,
    /// `sudo`, `rm_rf`, `curl_pipe_shell`, `authorized_keys`).
    #[serde(default)]
    pub class: Option<String>,
    /// Case-insensitive substring of the normalised SQL or command line.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The statement affected or returned at least this many rows.
    #[serde(default)]
    pub rows_min: Option<u64>,
    /// The session sent the client at least this many bytes (checked once
    /// per session: the gateway counts a session's bytes, not a statement's).
    #[serde(default)]
    pub bytes_min: Option<u64>,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("review rule {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("more than {RULES_MAX} review rules")]
    TooMany,
}

/// A rule checked and ready to match.
#[derive(Debug, Clone)]
struct Compiled {
    name: String,
    matcher: Option<Matcher>,
    pattern: Option<String>,
    rows_min: Option<u64>,
    bytes_min: Option<u64>,
    severity: Severity,
}

/// What a rule found in one statement or command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Finding {
    pub rule: String,
    pub severity: Severity,
    pub class: Class,
    /// The session it happened in.
    pub session: String,
    /// The recording entry (`seq`) of the statement or command.
    pub entry: u64,
    /// The statement or command, cut to [`crate::summary::FINDING_TEXT_LEN_MAX`].
    pub text: String,
}

/// The rules in force: built-in defaults first, then configured ones.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Compiled>,
}

impl RuleSet {
    /// The built-in rules (DESIGN §16).
    pub fn default_rules() -> Vec<Rule> {
        let r = |name: &str, class: &str, rows_min, bytes_min, severity| Rule {
            name: name.into(),
            class: Some(class.into()),
            pattern: None,
            rows_min,
            bytes_min,
            severity,
        };
        use Severity::*;
        vec![
            r("ddl", "ddl", None, None, Medium),
            r("privilege_change", "privilege", None, None, High),
            r(
                "delete_without_where",
                "delete_without_where",
                None,
                None,
                High,
            ),
            r(
                "update_without_where",
                "update_without_where",
                None,
                None,
                High,
            ),
            r("truncate", "truncate", None, None, High),
            r("copy_to", "copy_to", None, None, Medium),
            r("copy_program", "copy_program", None, None, High),
            r("large_export", "read", Some(EXPORT_ROWS_MIN), None, Medium),
            r(
                "large_export_bytes",
                "read",
                None,
                Some(EXPORT_BYTES_MIN),
                Medium,
            ),
            r("fastpath", "fastpath", None, None, Medium),
            r("role_setting", "role_setting", None, None, High),
            r("role_switch", "role_switch", None, None, Medium),
            r("unparsable", "unparsable", None, None, Medium),
            r("sudo", "sudo", None, None, Medium),
            r("rm_rf", "rm_rf", None, None, High),
            r("curl_pipe_shell", "curl_pipe_shell", None, None, High),
            r("authorized_keys", "authorized_keys", None, None, High),
        ]
    }

    /// The defaults (when `defaults`) followed by `configured`, each checked.
    pub fn new(defaults: bool, configured: &[Rule]) -> Result<RuleSet, RuleError> {
        if configured.len() > RULES_MAX {
            return Err(RuleError::TooMany);
        }
        let mut rules = Vec::new();
        let builtin = if defaults {
            Self::default_rules()
        } else {
            Vec::new()
        };
        for rule in builtin.iter().chain(configured) {
            rules.push(compile(rule)?);
        }
        Ok(RuleSet { rules })
    }

    /// The rules that match one statement or command. Without `rows`: the
    /// rules without thresholds (asked when the statement is seen); with
    /// `rows` (the statement's outcome): the rules with `rows_min` and no
    /// `bytes_min`. Each rule is thus asked once per statement.
    pub fn check(&self, c: &Classified, rows: Option<u64>) -> Vec<(&str, Severity)> {
        let upper = c.normalised.to_uppercase();
        self.rules
            .iter()
            .filter(|r| r.bytes_min.is_none() && r.rows_min.is_some() == rows.is_some())
            .filter(|r| match r.matcher {
                None => true,
                Some(Matcher::Class(k)) => c.class == k,
                Some(Matcher::Tag(t)) => c.tags.contains(&t),
            })
            .filter(|r| {
                r.pattern
                    .as_ref()
                    .is_none_or(|p| upper.contains(p.as_str()))
            })
            .filter(|r| r.rows_min.is_none_or(|m| rows.unwrap_or(0) >= m))
            .map(|r| (r.name.as_str(), r.severity))
            .collect()
    }

    /// The rules with `bytes_min`, asked once per session (the gateway
    /// counts the bytes a session sent, not each statement's): they match
    /// when the session sent at least that many bytes, ran a statement of
    /// their class or fact, and (with `rows_min`) returned or affected at
    /// least that many rows. Patterns are not asked here.
    pub fn check_session(
        &self,
        classes: &BTreeSet<Class>,
        tags: &BTreeSet<Tag>,
        rows: u64,
        bytes: u64,
    ) -> Vec<(&str, Severity)> {
        self.rules
            .iter()
            .filter(|r| r.bytes_min.is_some_and(|m| bytes >= m))
            .filter(|r| r.rows_min.is_none_or(|m| rows >= m))
            .filter(|r| match r.matcher {
                None => true,
                Some(Matcher::Class(k)) => classes.contains(&k),
                Some(Matcher::Tag(t)) => tags.contains(&t),
            })
            .map(|r| (r.name.as_str(), r.severity))
            .collect()
    }

    /// Whether some rule needs a statement's outcome (its rows).
    pub fn has_thresholds(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.rows_min.is_some() && r.bytes_min.is_none())
    }
}

fn compile(rule: &Rule) -> Result<Compiled, RuleError> {
    let bad = |reason: String| RuleError::Invalid {
        name: rule.name.clone(),
        reason,
    };
    if rule.name.is_empty() || rule.name.len() > RULE_TEXT_LEN_MAX {
        return Err(bad(format!(
            "a name of 1 to {RULE_TEXT_LEN_MAX} bytes is needed"
        )));
    }
    if let Err(e) = breakglass_core::model::check_text_chars("name", &rule.name) {
        return Err(bad(e));
    }
    let matcher = match rule.class.as_deref() {
        None => None,
        Some(s) => Some(match (Class::parse(s), Tag::parse(s)) {
            (Some(c), _) => Matcher::Class(c),
            (None, Some(t)) => Matcher::Tag(t),
            (None, None) => {
                let known: Vec<&str> = Class::ALL
                    .iter()
                    .map(|c| c.as_str())
                    .chain(Tag::ALL.iter().map(|t| t.as_str()))
                    .collect();
                return Err(bad(format!(
                    "unknown class {s:?} (known: {})",
                    known.join(", ")
                )));
            }
        }),
    };
    let pattern = match &rule.pattern {
        Some(p) if p.is_empty() || p.len() > RULE_TEXT_LEN_MAX => {
            return Err(bad(format!(
                "a pattern of 1 to {RULE_TEXT_LEN_MAX} bytes is needed"
            )));
        }
        Some(p) => Some(p.to_uppercase()),
        None => None,
    };
    if matcher.is_none() && pattern.is_none() && rule.rows_min.is_none() && rule.bytes_min.is_none()
    {
        return Err(bad(
            "a rule needs a class, a pattern or a threshold (rows_min, bytes_min); otherwise it flags everything".into(),
        ));
    }
    Ok(Compiled {
        name: rule.name.clone(),
        matcher,
        pattern,
        rows_min: rule.rows_min,
        bytes_min: rule.bytes_min,
        severity: rule.severity,
    })
}
