//! Automated review of ended grants: what each recorded statement or shell
//! command is ([`sql`], [`shell`]), which of them deserve a person's eyes
//! ([`rules`]), and the summary of a grant's sessions ([`summary`]).
//!
//! Everything here is pure except [`summary::summarise_postgres_recording`],
//! which reads one recording file through the PostgreSQL gateway's verifying
//! reader. The server decides what to do with a summary (close the grant as
//! `auto_ok`, or queue it for a person); this crate only says what happened.

pub mod rules;
pub mod shell;
pub mod sql;
pub mod summary;

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use rules::{Finding, Rule, RuleSet, Severity};
pub use summary::Summary;

/// What a statement or command does, for the summary's counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Reads data (`SELECT`, `SHOW`, `EXPLAIN` without `ANALYZE`, `FETCH`, `COPY ... TO`).
    Read,
    /// Changes data (`INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`, `COPY ... FROM`).
    Write,
    /// Changes the schema (`CREATE`, `ALTER`, `DROP` of anything but roles, `COMMENT`).
    Ddl,
    /// Changes who may do what (`GRANT`, `REVOKE`, `CREATE`/`ALTER`/`DROP ROLE`).
    Privilege,
    /// `BEGIN`, `COMMIT`, `ROLLBACK`, savepoints.
    Transaction,
    /// Session settings (`SET`, `RESET`, `SET ROLE`, `DISCARD`).
    Session,
    /// Everything else the parser knows (`PREPARE`, `VACUUM`, `LISTEN`, ...).
    Utility,
    /// Text the PostgreSQL parser does not accept: itself a finding.
    Unparsable,
    /// A shell command line (SSH sessions).
    Command,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Read,
        Class::Write,
        Class::Ddl,
        Class::Privilege,
        Class::Transaction,
        Class::Session,
        Class::Utility,
        Class::Unparsable,
        Class::Command,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Ddl => "ddl",
            Class::Privilege => "privilege",
            Class::Transaction => "transaction",
            Class::Session => "session",
            Class::Utility => "utility",
            Class::Unparsable => "unparsable",
            Class::Command => "command",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fact about one statement or command that rules can match besides its
/// class (DESIGN §16's built-in defaults are written with these).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    /// `DELETE` without a `WHERE` clause.
    DeleteWithoutWhere,
    /// `UPDATE` without a `WHERE` clause.
    UpdateWithoutWhere,
    Truncate,
    /// `COPY ... TO` (a file, a program or the client).
    CopyTo,
    /// `COPY ... TO PROGRAM` or `COPY ... FROM PROGRAM`: runs a command on the database host.
    CopyProgram,
    /// A fastpath FunctionCall (refused by the gateway, recorded as tried).
    Fastpath,
    /// `ALTER ROLE ... SET`/`RESET`: changes the settings a role's sessions start with.
    RoleSetting,
    /// `SET ROLE` or `SET SESSION AUTHORIZATION`: acts as another role.
    RoleSwitch,
    /// `sudo`, `doas`, `su`, `pkexec`.
    Sudo,
    /// `rm` with both recursive and force flags.
    RmRf,
    /// A download piped or substituted into a shell or interpreter.
    CurlPipeShell,
    /// Writing to an `authorized_keys` file (editor, redirect, `tee`, `sed -i`, ...).
    AuthorizedKeys,
}

impl Tag {
    pub const ALL: [Tag; 12] = [
        Tag::DeleteWithoutWhere,
        Tag::UpdateWithoutWhere,
        Tag::Truncate,
        Tag::CopyTo,
        Tag::CopyProgram,
        Tag::Fastpath,
        Tag::RoleSetting,
        Tag::RoleSwitch,
        Tag::Sudo,
        Tag::RmRf,
        Tag::CurlPipeShell,
        Tag::AuthorizedKeys,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tag::DeleteWithoutWhere => "delete_without_where",
            Tag::UpdateWithoutWhere => "update_without_where",
            Tag::Truncate => "truncate",
            Tag::CopyTo => "copy_to",
            Tag::CopyProgram => "copy_program",
            Tag::Fastpath => "fastpath",
            Tag::RoleSetting => "role_setting",
            Tag::RoleSwitch => "role_switch",
            Tag::Sudo => "sudo",
            Tag::RmRf => "rm_rf",
            Tag::CurlPipeShell => "curl_pipe_shell",
            Tag::AuthorizedKeys => "authorized_keys",
        }
    }

    pub fn parse(s: &str) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One classified statement or command: what rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    pub tags: Vec<Tag>,
    /// The normalised text rules' patterns match: the parser's rendering of
    /// the statement (keywords upper case, whitespace collapsed), or the
    /// command line as recorded; for unparsable SQL, the text as recorded.
    pub normalised: String,
}
