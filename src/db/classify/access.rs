//! What a statement needs of a node, for the router: may a replica run it?
//! Only a single plain `SELECT` (or `BEGIN READ ONLY`) may: no locking
//! clause, no `INTO`, no data-modifying CTE, and no function that is not
//! known to be immutable or stable (PostgreSQL's own, or
//! `router.replica_functions`). Everything else, text that does not parse
//! included, needs the primary. Read on the real grammar (`pg_query`), as
//! PgCat's keyword parser sent `nextval()` and `FOR NO KEY UPDATE SKIP
//! LOCKED` to replicas.
//!
//! Statements that differ only in their literals (`WHERE aid = 42` and
//! `WHERE aid = 43`) have one shape: a shape is parsed once and kept.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

/// PostgreSQL's functions of which no overload is volatile.
static READ_ONLY_FUNCTIONS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("read_only_functions.txt")
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
});

/// What a statement's shape allows, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Needs the primary.
    Write,
    /// A plain read, calling these functions that are not PostgreSQL's
    /// own read-only ones (lower case; `schema.name` when qualified).
    Read { functions: Box<[String]> },
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`.
    BeginReadOnly,
    /// `BEGIN` / `START TRANSACTION` that may write.
    Begin,
}

/// Where a statement may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A replica may run it.
    Read,
    /// A read-only transaction starts: a replica may run all of it.
    BeginReadOnly,
    /// A transaction starts that may write.
    Begin,
    Write,
    /// `/* gatehouse:primary */`.
    ForcedPrimary,
}

impl Shape {
    pub fn access(&self, replica_functions: &[String]) -> Access {
        match self {
            Shape::Write => Access::Write,
            Shape::BeginReadOnly => Access::BeginReadOnly,
            Shape::Begin => Access::Begin,
            Shape::Read { functions } => {
                if functions.iter().all(|f| replica_functions.contains(f)) {
                    Access::Read
                } else {
                    Access::Write
                }
            }
        }
    }
}

/// Shapes seen recently.
#[derive(Default)]
pub struct Shapes {
    known: Mutex<HashMap<Box<[u8]>, Arc<Shape>>>,
}

/// Shapes kept before the cache starts again.
const CACHED: usize = 8192;
/// Longer statements are not parsed for routing: they go to the primary.
const PARSED_LEN: usize = 64 * 1024;

impl Shapes {
    /// Where `sql` may go, for a client whose `standard_conforming_strings`
    /// is `standard_strings`.
    pub fn access(
        &self,
        sql: &[u8],
        standard_strings: bool,
        replica_functions: &[String],
    ) -> Access {
        if memchr::memmem::find(sql, b"gatehouse:primary").is_some() {
            return Access::ForcedPrimary;
        }
        if !may_read(sql) || sql.len() > PARSED_LEN {
            return Access::Write;
        }
        let Some(key) = shape_key(sql, standard_strings) else {
            return shape(sql, standard_strings).access(replica_functions);
        };
        let known = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key.as_slice())
            .cloned();
        let found = match known {
            Some(found) => found,
            None => {
                let found = Arc::new(shape(sql, standard_strings));
                let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                if known.len() >= CACHED {
                    known.clear();
                }
                known.insert(key.into(), Arc::clone(&found));
                found
            }
        };
        found.access(replica_functions)
    }
}

/// Whether the first word (after blanks, comments and parentheses) can
/// start a read: most writes are told apart without a parse.
fn may_read(sql: &[u8]) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_ascii_start();
        if let Some(after) = rest.strip_prefix(b"(") {
            rest = after;
        } else if rest.starts_with(b"--") {
            let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            rest = &rest[end..];
        } else if rest.starts_with(b"/*") {
            // Nested comments: the parse decides.
            return true;
        } else {
            break;
        }
    }
    let word_end = rest
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    let word = &rest[..word_end];
    [
        &b"select"[..],
        b"with",
        b"values",
        b"table",
        b"begin",
        b"start",
        b"set",
        b"reset",
        b"show",
    ]
    .iter()
    .any(|w| word.eq_ignore_ascii_case(w))
}

/// The bytes at which [`shape_key`] may find a literal, a quoted name or a
/// comment: quotes, `$`, digits, `-` and `/`.
static MAY_START: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = matches!(c as u8, b'\'' | b'"' | b'$' | b'0'..=b'9' | b'-' | b'/');
        c += 1;
    }
    table
};

/// `sql` with every string and number literal replaced by `?`, and the
/// string-escaping mode in front: statements that differ only in their
/// literals share it. `None` for text the lexer does not follow to its end
/// (an unterminated literal): it is parsed each time.
pub fn shape_key(sql: &[u8], standard_strings: bool) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(sql.len() + 1);
    key.push(u8::from(standard_strings));
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut i = 0;
    while i < sql.len() {
        // Bytes that can start nothing below are copied in one run.
        let run = sql[i..]
            .iter()
            .position(|&c| MAY_START[usize::from(c)])
            .map_or(sql.len(), |n| i + n);
        key.extend_from_slice(&sql[i..run]);
        i = run;
        let Some(&c) = sql.get(i) else { break };
        let after_ident = i > 0 && ident(sql[i - 1]);
        match c {
            b'\'' => {
                // E'...' (backslash escapes), or any string when
                // standard_conforming_strings is off.
                let escapes = !standard_strings
                    || (i > 0
                        && matches!(sql[i - 1], b'e' | b'E')
                        && !(i > 1 && ident(sql[i - 2])));
                i = string_end(sql, i + 1, b'\'', escapes)?;
                key.push(b'?');
            }
            b'"' => {
                let end = string_end(sql, i + 1, b'"', false)?;
                key.extend_from_slice(&sql[i..end]);
                i = end;
            }
            b'$' if !after_ident => {
                // `$1` is a parameter; `$tag$` opens a dollar-quoted string.
                let tag_end = sql[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c >= 0x80))
                    .map_or(sql.len(), |n| i + 1 + n);
                if sql.get(tag_end) == Some(&b'$')
                    && !sql.get(i + 1).is_some_and(u8::is_ascii_digit)
                {
                    let tag = &sql[i..=tag_end];
                    let body = tag_end + 1;
                    let close = memchr::memmem::find(&sql[body..], tag)?;
                    i = body + close + tag.len();
                    key.push(b'?');
                } else {
                    key.extend_from_slice(&sql[i..tag_end]);
                    i = tag_end;
                }
            }
            b'0'..=b'9' if !after_ident => {
                while i < sql.len() && (sql[i].is_ascii_digit() || sql[i] == b'.') {
                    i += 1;
                }
                key.push(b'?');
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                let end = memchr::memchr(b'\n', &sql[i..]).map_or(sql.len(), |n| i + n);
                key.extend_from_slice(&sql[i..end]);
                i = end;
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let end = comment_end(sql, i)?;
                key.extend_from_slice(&sql[i..end]);
                i = end;
            }
            _ => {
                key.push(c);
                i += 1;
            }
        }
    }
    Some(key)
}

/// Past the closing `quote` of a literal whose body starts at `from`; a
/// doubled quote is one quote, and with `escapes` a backslash escapes the
/// next byte.
fn string_end(sql: &[u8], mut from: usize, quote: u8, escapes: bool) -> Option<usize> {
    while from < sql.len() {
        let c = sql[from];
        if escapes && c == b'\\' {
            from += 2;
        } else if c == quote {
            if sql.get(from + 1) == Some(&quote) {
                from += 2;
            } else {
                return Some(from + 1);
            }
        } else {
            from += 1;
        }
    }
    None
}

/// Past the end of the (nested) comment opening at `from`.
fn comment_end(sql: &[u8], mut from: usize) -> Option<usize> {
    let mut depth = 0usize;
    while from + 1 < sql.len() {
        match (sql[from], sql[from + 1]) {
            (b'/', b'*') => {
                depth += 1;
                from += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                from += 2;
                if depth == 0 {
                    return Some(from);
                }
            }
            _ => from += 1,
        }
    }
    None
}

/// The shape of `sql`, parsed with PostgreSQL's grammar.
pub fn shape(sql: &[u8], standard_strings: bool) -> Shape {
    let Ok(text) = std::str::from_utf8(sql) else {
        return Shape::Write;
    };
    let options = if standard_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let Ok(parsed) = pg_query::parse(text, options) else {
        return Shape::Write;
    };
    let Ok(tree) = serde_json::to_value(&parsed.protobuf) else {
        return Shape::Write;
    };
    let statements = tree
        .get("stmts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let [statement] = statements else {
        return Shape::Write;
    };
    let Some(node) = statement.pointer("/stmt/node") else {
        return Shape::Write;
    };
    if let Some(transaction) = node.get("TransactionStmt") {
        return match begins(transaction) {
            Some(true) => Shape::BeginReadOnly,
            Some(false) => Shape::Begin,
            None => Shape::Write,
        };
    }
    // Settings write no WAL, and follow the client to any server (the
    // session carries them): a replica may take them.
    if node.get("VariableSetStmt").is_some() || node.get("VariableShowStmt").is_some() {
        return Shape::Read {
            functions: Box::new([]),
        };
    }
    if node.get("SelectStmt").is_none() {
        return Shape::Write;
    }
    let mut functions = Vec::new();
    if writes(node, &mut functions) {
        return Shape::Write;
    }
    functions.sort();
    functions.dedup();
    Shape::Read {
        functions: functions.into(),
    }
}

/// `TransactionStmt.kind`: `BEGIN` and `START TRANSACTION`.
const TRANS_STMT_BEGIN: i64 = 1;
const TRANS_STMT_START: i64 = 2;

/// For `BEGIN` or `START TRANSACTION`, whether it is `READ ONLY` (and
/// not `READ WRITE` after that); `None` for other transaction statements.
fn begins(transaction: &Value) -> Option<bool> {
    let kind = transaction.get("kind").and_then(Value::as_i64).unwrap_or(0);
    if kind != TRANS_STMT_BEGIN && kind != TRANS_STMT_START {
        return None;
    }
    let mut read_only = false;
    for option in transaction
        .get("options")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(element) = option.pointer("/node/DefElem") else {
            continue;
        };
        if element.get("defname").and_then(Value::as_str) == Some("transaction_read_only") {
            read_only = element
                .pointer("/arg/node/AConst/val/Ival/ival")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 1;
        }
    }
    Some(read_only)
}

/// Whether a SELECT's tree does anything a replica cannot: a locking
/// clause, `INTO`, a data-modifying statement inside it. The functions it
/// calls that are not PostgreSQL's read-only ones are added to `functions`.
fn writes(value: &Value, functions: &mut Vec<String>) -> bool {
    match value {
        Value::Object(fields) => fields.iter().any(|(kind, node)| {
            match kind.as_str() {
                "locking_clause" if node.as_array().is_some_and(|a| !a.is_empty()) => {
                    return true;
                }
                "into_clause" if !node.is_null() => return true,
                "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => return true,
                "FuncCall" => {
                    if let Some(name) = unsafe_function(node) {
                        functions.push(name);
                    }
                }
                _ => {}
            }
            writes(node, functions)
        }),
        Value::Array(items) => items.iter().any(|item| writes(item, functions)),
        _ => false,
    }
}

/// A called function's name, unless it is one of PostgreSQL's read-only
/// ones.
fn unsafe_function(call: &Value) -> Option<String> {
    let names = super::qualified_name(call.get("funcname"));
    match names.as_slice() {
        [name] | ["pg_catalog", name] if READ_ONLY_FUNCTIONS.contains(name) => None,
        // Volatile, but it only changes a setting (Django's connection
        // setup): as `SET`.
        [name] | ["pg_catalog", name] if name.eq_ignore_ascii_case("set_config") => None,
        _ => Some(names.join(".").to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Access, Shape, Shapes, shape, shape_key};

    fn access(sql: &str) -> Access {
        Shapes::default().access(sql.as_bytes(), true, &[])
    }

    #[test]
    fn plain_reads_may_go_to_a_replica() {
        for sql in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = 42;",
            "SELECT now(), lower(name), count(*) FROM t GROUP BY 2",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "(SELECT 1) UNION (SELECT 2)",
            "VALUES (1), (2)",
            "TABLE t",
            "SELECT inet_server_port()",
            "  -- a comment\n SELECT 1",
            "/* a /* nested */ comment */ SELECT 1",
            "SELECT pg_catalog.upper('x')",
            "SELECT \"t\".\"id\" FROM \"t\" WHERE \"t\".\"id\" = $1 LIMIT 21",
            // Django's connection setup, and settings: no WAL.
            "SELECT set_config('TimeZone', 'UTC', false)",
            "SET TimeZone TO 'UTC'",
            "RESET statement_timeout",
            "SHOW search_path",
        ] {
            assert_eq!(access(sql), Access::Read, "{sql}");
        }
    }

    #[test]
    fn everything_else_needs_the_primary() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "SELECT nextval('s')",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
            "SELECT * FROM t FOR SHARE",
            "WITH moved AS (DELETE FROM t RETURNING *) SELECT * FROM moved",
            "WITH x AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM x",
            "SELECT my_function(1)",
            "SELECT public.lower('x')",
            "SELECT * INTO t2 FROM t",
            "SELECT 1; SELECT 2",
            "SELECT 1; DELETE FROM t",
            "SELECT pg_advisory_lock(1)",
            "SELECT random()",
            "SELECT setval('s', 1)",
            "SELECT * FROM generate_series(1, 3), nextval('s')",
            "SELECT set_config('x', nextval('s')::text, false)",
            "SELEC 1",
            "BEGIN",
            "BEGIN READ WRITE",
            "BEGIN READ ONLY; SELECT 1",
            "COMMIT",
            "EXPLAIN ANALYZE SELECT 1",
            "DELETE FROM t",
            "select 1 from t for key share",
        ] {
            assert_ne!(access(sql), Access::Read, "{sql}");
            assert_ne!(access(sql), Access::BeginReadOnly, "{sql}");
        }
    }

    #[test]
    fn read_only_transactions_and_forced_statements() {
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction isolation level repeatable read, read only",
            "START TRANSACTION READ ONLY",
        ] {
            assert_eq!(access(sql), Access::BeginReadOnly, "{sql}");
        }
        assert_eq!(access("BEGIN READ ONLY, READ WRITE"), Access::Begin);
        assert_eq!(access("BEGIN"), Access::Begin);
        assert_eq!(
            access("start transaction isolation level serializable"),
            Access::Begin
        );
        assert_eq!(
            access("/* gatehouse:primary */ SELECT 1"),
            Access::ForcedPrimary
        );
    }

    #[test]
    fn configured_functions_may_run_on_a_replica() {
        let shapes = Shapes::default();
        let sql = b"SELECT app.price_of(1), lower('x')";
        assert_eq!(shapes.access(sql, true, &[]), Access::Write);
        assert_eq!(
            shapes.access(sql, true, &["app.price_of".to_string()]),
            Access::Read
        );
        assert_eq!(
            shape(sql, true),
            Shape::Read {
                functions: vec!["app.price_of".to_string()].into()
            }
        );
    }

    #[test]
    fn literals_share_a_shape_and_code_does_not() {
        let key = |sql: &str| shape_key(sql.as_bytes(), true);
        assert_eq!(
            key("SELECT a FROM t WHERE id = 42"),
            key("SELECT a FROM t WHERE id = 7.5")
        );
        assert_eq!(key("SELECT 'x'"), key("SELECT 'it''s'"));
        assert_eq!(key("SELECT $$a$$"), key("SELECT $q$b$q$"));
        assert_ne!(key("SELECT 'x'"), key("SELECT 'x'; DELETE FROM t"));
        assert_ne!(key("SELECT $1"), key("SELECT $2"));
        assert_ne!(key("SELECT t1.a"), key("SELECT t2.a"));
        assert_eq!(key("SELECT 'unterminated"), None);
        // A backslash ends nothing in a standard string...
        assert_ne!(key(r"SELECT 'a\'; DELETE FROM t; --'"), key("SELECT 'x'"));
        // ...and escapes the quote in an E'' string, or with
        // standard_conforming_strings off.
        assert_eq!(key(r"SELECT E'a\'b'"), key("SELECT E'x'"));
        assert_eq!(
            shape_key(br"SELECT 'a\'b'", false),
            shape_key(b"SELECT 'x'", false)
        );
        assert_ne!(
            shape_key(b"SELECT 'x'", false),
            shape_key(b"SELECT 'x'", true)
        );
        // A comment's quote is not a string.
        assert_ne!(key("SELECT 1 -- it's\n; DELETE FROM t"), key("SELECT 1"));
        assert_eq!(access(r"SELECT 'a\'; DELETE FROM t; --'"), Access::Write);
    }

    #[test]
    fn a_cached_shape_answers_a_statement_with_other_literals() {
        let shapes = Shapes::default();
        for aid in 0..100 {
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
            assert_eq!(shapes.access(sql.as_bytes(), true, &[]), Access::Read);
        }
        assert_eq!(shapes.known.lock().unwrap().len(), 1);
    }
}
