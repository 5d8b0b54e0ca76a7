//! What a statement means for pooling: does it leave state on the server
//! session that would leak to the next client of a transaction-pooled
//! connection (pgbouncer #396, #452)? Read on the real PostgreSQL grammar
//! (`pg_query`), never on keywords: `$$` quoting, `E''` strings, nested
//! comments and `pg_advisory_lock (1)` are what the server sees.
//!
//! A statement's [`Effect`] is either nothing, session settings (which the
//! session tracks when the server reports them, so the client need not be
//! pinned), or other session state: `LISTEN`, session advisory locks,
//! temporary relations, `WITH HOLD` cursors, SQL `PREPARE`, `LOAD`,
//! `DISCARD`, and whatever cannot be known statically: `DO` blocks,
//! procedures, and calls of functions that are not PostgreSQL's own
//! (a function may run any SQL). A false positive costs pooling; a false
//! negative leaks. Triggers, views and column defaults that call such
//! functions are not seen here (docs/decisions.md).

pub mod access;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

/// What a statement (or the statements of one Query) leaves behind after
/// its transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// Session settings it may change (`SET`, `RESET`, `set_config(name,
    /// value, false)`), lower case, as the statement names them.
    pub settings: Vec<String>,
    /// Other session state, or state that cannot be known: why.
    pub session: Option<&'static str>,
}

impl Effect {
    /// Nothing outlives the transaction.
    pub const NONE: Effect = Effect {
        settings: Vec::new(),
        session: None,
    };

    fn session(why: &'static str) -> Effect {
        Effect {
            settings: Vec::new(),
            session: Some(why),
        }
    }

    /// Whether the client must keep its server connection: session state
    /// other than settings that `tracked` says are carried across
    /// connections.
    pub fn pins(&self, tracked: impl Fn(&str) -> bool) -> bool {
        self.session.is_some() || self.settings.iter().any(|name| !tracked(name))
    }

    fn add(&mut self, other: Effect) {
        if self.session.is_none() {
            self.session = other.session;
        }
        for name in other.settings {
            if !self.settings.contains(&name) {
                self.settings.push(name);
            }
        }
    }
}

/// PostgreSQL's own functions; see `builtin_functions.txt`.
static BUILTIN: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("classify/builtin_functions.txt")
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
});

/// PostgreSQL's own functions that hold state past the transaction.
const STATEFUL_BUILTINS: [&str; 15] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_session_reset",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
];

/// Words without which a statement cannot change session state, unless it
/// calls a function (`(`): most queries are cleared without a parse.
static WORDS: Words = Words::new(&[
    b"set", b"listen", b"prepare", b"load", b"temp", b"hold", b"discard", b"do", b"call", b"into",
    b"(",
]);

static DATABASE: Words = Words::new(&[b"database"]);

/// Up to 16 words of at most 8 bytes, looked for anywhere in a text,
/// ignoring case. A prefilter: a false match only costs a parse.
struct Words {
    /// Each word as a little-endian integer of its bytes with bit 5 set,
    /// and the mask of its length.
    words: [(u64, u64); 16],
    /// For each byte, the words that start with it in either case, as a
    /// bit set of their indexes.
    first: [u16; 256],
}

impl Words {
    const fn new(list: &[&[u8]]) -> Words {
        let mut words = [(0u64, 0u64); 16];
        let mut first = [0u16; 256];
        let mut i = 0;
        while i < list.len() {
            let word = list[i];
            assert!(word.len() <= 8 && i < 16);
            let mut j = 0;
            while j < word.len() {
                words[i].0 |= ((word[j] | 0x20) as u64) << (8 * j);
                words[i].1 |= 0xff << (8 * j);
                j += 1;
            }
            first[word[0] as usize] |= 1 << i;
            first[word[0].to_ascii_uppercase() as usize] |= 1 << i;
            i += 1;
        }
        Words { words, first }
    }

    /// Whether any word occurs in `text`: one pass, and at each byte only
    /// the words that start with it are compared, eight bytes at once with
    /// bit 5 set in each (ASCII letters in lowercase).
    fn in_text(&self, text: &[u8]) -> bool {
        text.iter().enumerate().any(|(i, &c)| {
            let mut candidates = self.first[usize::from(c)];
            if candidates == 0 {
                return false;
            }
            // One load of eight bytes; only the last seven bytes of a text
            // need a padded copy.
            let mut window = [0u8; 8];
            match text.get(i..i + 8) {
                Some(eight) => window.copy_from_slice(eight),
                None => {
                    let rest = &text[i..];
                    window[..rest.len()].copy_from_slice(rest);
                }
            }
            let window = u64::from_le_bytes(window) | 0x2020_2020_2020_2020;
            while candidates != 0 {
                let (word, mask) = self.words[candidates.trailing_zeros() as usize];
                // A word longer than what is left meets bytes past the
                // end, which became spaces: no letter matches them.
                if window & mask == word {
                    return true;
                }
                candidates &= candidates - 1;
            }
            false
        })
    }
}

/// Whether `sql` holds none of the words that could make it set session
/// state or name a database to close: a text that needs no further look,
/// before or after it goes to the server.
pub fn is_plain(sql: &[u8]) -> bool {
    !WORDS.in_text(sql) && !DATABASE.in_text(sql)
}

/// Statements classified recently, by their text: clients repeat the same
/// few statements, with parameters or not.
pub struct Classifier {
    known: Mutex<HashMap<Box<[u8]>, Arc<Effect>>>,
}

/// How many texts the cache holds before it starts again.
const CACHED: usize = 4096;
/// Longer statements are not parsed (a tree of many megabytes, for one
/// statement, is a cost a client could impose at will): they count as
/// session state.
const PARSED_LEN: usize = 256 * 1024;
/// Longer texts are classified each time, not kept.
const CACHED_LEN: usize = 4096;

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            known: Mutex::new(HashMap::new()),
        }
    }
}

impl Classifier {
    /// The effect of `sql` (one or more statements) for a client whose
    /// `standard_conforming_strings` is what `standard_strings` says; `None`
    /// when the statement cannot change the session (most, told apart
    /// without a parse).
    pub fn effect(
        &self,
        sql: &[u8],
        standard_strings: impl FnOnce() -> bool,
    ) -> Option<Arc<Effect>> {
        if !WORDS.in_text(sql) {
            return None;
        }
        let standard_strings = standard_strings();
        if sql.len() > CACHED_LEN {
            return Some(Arc::new(effect(sql, standard_strings)));
        }
        let mut key = Vec::with_capacity(sql.len() + 1);
        key.push(u8::from(standard_strings));
        key.extend_from_slice(sql);
        if let Some(known) = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key.as_slice())
        {
            return Some(Arc::clone(known));
        }
        let found = Arc::new(effect(sql, standard_strings));
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= CACHED {
            known.clear();
        }
        known.insert(key.into(), Arc::clone(&found));
        Some(found)
    }
}

/// The effect of `sql`, parsed with PostgreSQL's grammar. Text that does not
/// parse counts as session state: what the server makes of it is unknown.
/// With `standard_strings` false, backslashes escape in `'...'` literals
/// (`standard_conforming_strings = off`).
pub fn effect(sql: &[u8], standard_strings: bool) -> Effect {
    if sql.len() > PARSED_LEN {
        return Effect::session("too long to read");
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        return Effect::session("not UTF-8");
    };
    let options = if standard_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let Ok(parsed) = pg_query::parse(text, options) else {
        return Effect::session("not parsed");
    };
    let Ok(tree) = serde_json::to_value(&parsed.protobuf) else {
        return Effect::session("not parsed");
    };
    let mut found = Effect::NONE;
    visit(&tree, &mut found);
    found
}

/// Every node of the tree, whatever holds it.
fn visit(value: &Value, found: &mut Effect) {
    match value {
        Value::Object(fields) => {
            // A relation (a `RangeVar`, wherever it is held): temporary by
            // its keyword or by its schema.
            if let Some(persistence) = fields.get("relpersistence") {
                let in_temp_schema = fields
                    .get("schemaname")
                    .and_then(Value::as_str)
                    .is_some_and(|schema| schema.to_ascii_lowercase().starts_with("pg_temp"));
                if persistence == "t" || in_temp_schema {
                    found.add(Effect::session("temporary relation"));
                }
            }
            for (kind, node) in fields {
                if let Some(effect) = node_effect(kind, node) {
                    found.add(effect);
                }
                visit(node, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| visit(item, found)),
        _ => {}
    }
}

/// `VariableSetStmt.kind`: `RESET ALL`.
const VAR_RESET_ALL: i64 = 6;
/// `DeclareCursorStmt.options`: `WITH HOLD`.
const CURSOR_OPT_HOLD: i64 = 0x20;

/// The effect of one node of kind `kind`, when it has one of its own.
fn node_effect(kind: &str, node: &Value) -> Option<Effect> {
    let text = |field: &str| node.get(field).and_then(Value::as_str).unwrap_or("");
    let number = |field: &str| node.get(field).and_then(Value::as_i64).unwrap_or(0);
    let flag = |field: &str| node.get(field).and_then(Value::as_bool).unwrap_or(false);
    Some(match kind {
        "VariableSetStmt" => {
            let name = text("name").to_ascii_lowercase();
            if flag("is_local") || name == "transaction" {
                return None;
            }
            if number("kind") == VAR_RESET_ALL {
                return Some(Effect::session("RESET ALL"));
            }
            if name == "session characteristics" {
                return Some(Effect::session("SET SESSION CHARACTERISTICS"));
            }
            Effect {
                settings: vec![name],
                session: None,
            }
        }
        "DoStmt" => Effect::session("DO block"),
        "CallStmt" => Effect::session("procedure call"),
        "ListenStmt" => Effect::session("LISTEN"),
        "PrepareStmt" => Effect::session("PREPARE"),
        "LoadStmt" => Effect::session("LOAD"),
        "DiscardStmt" => Effect::session("DISCARD"),
        "DeclareCursorStmt" if number("options") & CURSOR_OPT_HOLD != 0 => {
            Effect::session("WITH HOLD cursor")
        }
        "CreateFunctionStmt" if names_temp_schema(node.get("funcname")) => {
            Effect::session("temporary function")
        }
        "FuncCall" => return call_effect(node),
        _ => return None,
    })
}

/// A qualified name (a list of `String` nodes) in `pg_temp`.
fn names_temp_schema(names: Option<&Value>) -> bool {
    let names = qualified_name(names);
    names.len() > 1 && names[0].to_ascii_lowercase().starts_with("pg_temp")
}

/// A qualified name's parts, from a list of `String` nodes.
fn qualified_name(names: Option<&Value>) -> Vec<&str> {
    names
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.pointer("/node/String/sval").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// The text of a string constant (`A_Const`).
fn string_constant(constant: &Value) -> Option<&str> {
    constant.pointer("/val/Sval/sval").and_then(Value::as_str)
}

/// A function call: PostgreSQL's own functions change nothing, except the
/// stateful ones and `set_config(name, value, false)`, a setting. Any
/// other function may do anything.
fn call_effect(node: &Value) -> Option<Effect> {
    let names = qualified_name(node.get("funcname"));
    let (schema, name) = match names.as_slice() {
        [name] => (None, *name),
        [schema, name] => (Some(*schema), *name),
        _ => return Some(Effect::session("function in another database")),
    };
    if schema.is_some_and(|schema| schema != "pg_catalog") || !BUILTIN.contains(name) {
        return Some(Effect::session("function not known to be safe"));
    }
    if STATEFUL_BUILTINS.contains(&name) {
        return Some(Effect::session("session-level built-in function"));
    }
    if name != "set_config" {
        return None;
    }
    let args: Vec<&Value> = node
        .get("args")
        .and_then(Value::as_array)
        .map(|args| args.iter().collect())
        .unwrap_or_default();
    let constant = |i: usize| args.get(i).and_then(|a| a.pointer("/node/AConst"));
    let setting = constant(0).and_then(string_constant);
    let local = constant(2).and_then(|c| {
        c.pointer("/val/Boolval/boolval")
            .and_then(Value::as_bool)
            // 'true', 'off', ... as a string literal.
            .or_else(|| match string_constant(c)?.to_ascii_lowercase().as_str() {
                "t" | "true" | "on" | "yes" | "y" | "1" => Some(true),
                "f" | "false" | "off" | "no" | "n" | "0" => Some(false),
                _ => None,
            })
    });
    match (setting, local) {
        (_, Some(true)) => None,
        (Some(setting), Some(false)) => Some(Effect {
            settings: vec![setting.to_ascii_lowercase()],
            session: None,
        }),
        _ => Some(Effect::session(
            "set_config of a setting not known statically",
        )),
    }
}

/// `RenameStmt.rename_type` for `ALTER DATABASE … RENAME`.
const OBJECT_DATABASE: i64 = 10;

/// The databases a statement needs nobody connected to: `DROP DATABASE x`,
/// `ALTER DATABASE x RENAME`, and the template of `CREATE DATABASE … TEMPLATE
/// x`. Idle pooled connections to them are closed first, or the server
/// refuses (Django's test runner creates and drops its test database).
pub fn databases_needing_no_sessions(sql: &[u8]) -> Vec<String> {
    if sql.len() > PARSED_LEN || !DATABASE.in_text(sql) {
        return Vec::new();
    }
    let Some(tree) = std::str::from_utf8(sql)
        .ok()
        .and_then(|text| pg_query::parse(text, pg_query::ParserOptions::DEFAULT).ok())
        .and_then(|parsed| serde_json::to_value(&parsed.protobuf).ok())
    else {
        return Vec::new();
    };
    let statements = tree.get("stmts").and_then(Value::as_array);
    let mut names = Vec::new();
    for statement in statements.into_iter().flatten() {
        let Some(node) = statement.pointer("/stmt/node") else {
            continue;
        };
        let text =
            |node: &Value, field: &str| node.get(field).and_then(Value::as_str).map(str::to_string);
        if let Some(drop) = node.get("DropdbStmt") {
            names.extend(text(drop, "dbname"));
        } else if let Some(rename) = node.get("RenameStmt") {
            if rename.get("rename_type").and_then(Value::as_i64) == Some(OBJECT_DATABASE) {
                names.extend(text(rename, "subname"));
            }
        } else if let Some(create) = node.get("CreatedbStmt") {
            let options = create.get("options").and_then(Value::as_array);
            for option in options.into_iter().flatten() {
                let Some(option) = option.pointer("/node/DefElem") else {
                    continue;
                };
                if option.get("defname").and_then(Value::as_str) == Some("template") {
                    names.extend(
                        option
                            .pointer("/arg/node/String/sval")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    );
                }
            }
        }
    }
    names
}

/// Whether `sql` starts with `word` (lowercase ASCII), ignoring case and
/// leading white space: a cheap test before [`words`].
fn starts_with_word(sql: &[u8], word: &[u8]) -> bool {
    sql.trim_ascii_start()
        .get(..word.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
}

/// The words of a single short statement, without a trailing `;`.
fn words(sql: &[u8]) -> Vec<&[u8]> {
    let sql = sql.trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql);
    sql.split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty())
        .collect()
}

/// `DEALLOCATE [PREPARE] name`: the statement's name as the server reads
/// it (folded to lower case unless quoted). `ALL` is not a name.
pub fn deallocates(sql: &[u8]) -> Option<Vec<u8>> {
    if !starts_with_word(sql, b"deallocate") {
        return None;
    }
    let words = words(sql);
    let name = match words.as_slice() {
        [first, name] if first.eq_ignore_ascii_case(b"deallocate") => *name,
        [first, second, name]
            if first.eq_ignore_ascii_case(b"deallocate")
                && second.eq_ignore_ascii_case(b"prepare") =>
        {
            *name
        }
        _ => return None,
    };
    if name.eq_ignore_ascii_case(b"all") {
        return None;
    }
    match name.strip_prefix(b"\"").and_then(|n| n.strip_suffix(b"\"")) {
        Some(quoted) => {
            let text = String::from_utf8_lossy(quoted).replace("\"\"", "\"");
            Some(text.into_bytes())
        }
        None => Some(name.to_ascii_lowercase()),
    }
}

/// `DEALLOCATE [PREPARE] ALL`: every prepared statement of the session goes.
pub fn deallocates_all(sql: &[u8]) -> bool {
    if !starts_with_word(sql, b"deallocate") {
        return false;
    }
    let words = words(sql);
    let is = |word: &[u8], expected: &[u8]| word.eq_ignore_ascii_case(expected);
    match words.as_slice() {
        [a, b] => is(a, b"deallocate") && is(b, b"all"),
        [a, b, c] => is(a, b"deallocate") && is(b, b"prepare") && is(c, b"all"),
        _ => false,
    }
}

/// `DISCARD ALL`: the whole session state goes, prepared statements too.
pub fn discards_all(sql: &[u8]) -> bool {
    if !starts_with_word(sql, b"discard") {
        return false;
    }
    let words = words(sql);
    matches!(words.as_slice(), [a, b] if a.eq_ignore_ascii_case(b"discard") && b.eq_ignore_ascii_case(b"all"))
}

#[cfg(test)]
mod tests {
    use super::{DATABASE, WORDS, deallocates, deallocates_all, discards_all, effect};
    use proptest::prelude::Strategy;

    #[test]
    fn the_prefilter_finds_its_words_in_any_case_anywhere() {
        for text in [
            &b"SET x = 1"[..],
            b"select 1; reset all",
            b"LiStEn ch",
            b"select f(1)",
            b"x(",
            b"DISCARD",
            b"abc do",
        ] {
            assert!(WORDS.in_text(text), "{}", String::from_utf8_lossy(text));
        }
        for text in [
            &b"SELECT abalance FROM pgbench_accounts WHERE aid = 42"[..],
            b"",
            b"se",
            b"UPDATE t SET", // "set" ends the text: found
        ] {
            let expected = text.ends_with(b"SET");
            assert_eq!(
                WORDS.in_text(text),
                expected,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        assert!(DATABASE.in_text(b"drop DataBase x"));
        assert!(!DATABASE.in_text(b"drop databas"));
    }

    #[test]
    fn deallocation() {
        assert_eq!(deallocates(b"DEALLOCATE _pg3_0"), Some(b"_pg3_0".to_vec()));
        assert_eq!(deallocates(b"deallocate prepare Q1;"), Some(b"q1".to_vec()));
        assert_eq!(
            deallocates(b"DEALLOCATE \"My\"\"Q\""),
            Some(b"My\"Q".to_vec())
        );
        assert_eq!(deallocates(b"DEALLOCATE ALL"), None);
        assert_eq!(deallocates(b"SELECT 1"), None);
        assert!(deallocates_all(b"DEALLOCATE ALL"));
        assert!(deallocates_all(b" deallocate prepare all ; "));
        assert!(discards_all(b"discard all;"));
        assert!(!discards_all(b"DISCARD PLANS"));
        assert!(!deallocates_all(b"DEALLOCATE q1"));
    }

    /// Settings the server reports, as a PostgreSQL 15 session does.
    fn reported(name: &str) -> bool {
        [
            "timezone",
            "datestyle",
            "intervalstyle",
            "application_name",
            "client_encoding",
        ]
        .contains(&name)
    }

    fn pins(sql: &str) -> bool {
        effect(sql.as_bytes(), true).pins(reported)
    }

    #[test]
    fn session_state_pins() {
        for sql in [
            "SET search_path TO app",
            "set statement_timeout = 0",
            "BEGIN; SET work_mem = '64MB'; COMMIT",
            "RESET ALL",
            "RESET search_path",
            "LISTEN jobs",
            "SELECT pg_advisory_lock(42)",
            "SELECT pg_advisory_lock (4243)",
            "SELECT pg_catalog.pg_try_advisory_lock_shared(1, 2)",
            "SELECT \"pg_advisory_lock\"(1)",
            "select set_config('search_path', 'x', false)",
            "select set_config($1, 'x', false)",
            "select set_config('TimeZone', 'UTC', $1)",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t (x int)",
            "CREATE TABLE pg_temp.t (x int)",
            "CREATE TEMP TABLE t AS SELECT 1",
            "SELECT 1 AS x INTO TEMP t",
            "CREATE TEMP VIEW v AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE q AS SELECT 1",
            "/* hi /* nested */ still */ SET x.y = 1",
            "DISCARD ALL",
            "DO $$BEGIN EXECUTE 'SET search_path TO leaked'; END$$",
            "DO $x$ SELECT 1 $x$",
            "SELECT my_function()",
            "SELECT public.lower('x')",
            "CALL my_procedure()",
            "LOAD 'auto_explain'",
            "SET SESSION AUTHORIZATION DEFAULT",
            "SET ROLE NONE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "WITH x AS (SELECT pg_advisory_lock(1)) SELECT * FROM x",
            "SELECT CASE WHEN true THEN pg_advisory_lock(1) END",
            "SELECT 1; SELECT 2; LISTEN late",
            "not sql at all",
        ] {
            assert!(pins(sql), "{sql}");
        }
    }

    #[test]
    fn reported_settings_are_tracked_not_pinned() {
        for (sql, setting) in [
            ("SELECT set_config('TimeZone', $1, false)", "timezone"),
            ("SELECT set_config('TimeZone', 'UTC', 'off')", "timezone"),
            ("SET TIME ZONE 'Europe/Paris'", "timezone"),
            ("SET TimeZone = DEFAULT", "timezone"),
            ("RESET DateStyle", "datestyle"),
            ("set application_name to 'x'", "application_name"),
            ("SET intervalstyle FROM CURRENT", "intervalstyle"),
        ] {
            let found = effect(sql.as_bytes(), true);
            assert_eq!(found.settings, [setting], "{sql}");
            assert_eq!(found.session, None, "{sql}");
            assert!(!found.pins(reported), "{sql}");
        }
    }

    #[test]
    fn ordinary_statements_do_not() {
        for sql in [
            "SELECT 1",
            "BEGIN; SET LOCAL statement_timeout = 100; SELECT 1; COMMIT",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT pg_advisory_xact_lock(42)",
            "SELECT set_config('search_path', 'x', true)",
            "INSERT INTO notes (body) VALUES ('please SET the table; LISTEN up')",
            "INSERT INTO notes (body) VALUES ($$ pg_advisory_lock(1) $$)",
            "SELECT E'it''s \\' LISTEN x; ' AS s",
            "UPDATE t SET x = 1 -- and SET y\n",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE TABLE t (x int)",
            "SELECT count(*), lower(name), now() FROM t WHERE id IN (1, 2)",
            "SELECT pg_catalog.format_type(1, 2)",
            "SELECT x INTO t2 FROM t",
            "UNLISTEN *",
        ] {
            assert!(!pins(sql), "{sql}");
        }
    }

    #[test]
    fn statements_that_need_a_database_without_sessions() {
        use super::databases_needing_no_sessions as needing;
        assert_eq!(
            needing(b"DROP DATABASE IF EXISTS \"test_app\""),
            ["test_app"]
        );
        assert_eq!(needing(b"drop database Shop WITH (FORCE)"), ["shop"]);
        assert_eq!(needing(b"ALTER DATABASE a RENAME TO b"), ["a"]);
        assert_eq!(
            needing(b"CREATE DATABASE c TEMPLATE \"Tpl\" OWNER app"),
            ["Tpl"]
        );
        assert!(needing(b"CREATE DATABASE c").is_empty());
        assert!(needing(b"ALTER DATABASE a SET work_mem = '1MB'").is_empty());
        assert!(needing(b"SELECT 'DROP DATABASE x'").is_empty());
    }

    #[test]
    fn very_long_statements_are_not_parsed_and_count_as_session_state() {
        let long = format!("SELECT {}1", "1 + ".repeat(70_000));
        assert!(long.len() > super::PARSED_LEN);
        assert_eq!(
            effect(long.as_bytes(), true).session,
            Some("too long to read")
        );
    }

    #[test]
    fn strings_read_as_the_client_reads_them() {
        // With standard_conforming_strings off, \' does not end the literal.
        let sql = br"SELECT 'a\'; SELECT pg_advisory_lock(1); --'";
        assert!(!effect(sql, false).pins(reported));
        assert!(effect(sql, true).pins(reported));
    }

    #[test]
    fn the_cache_answers_as_the_grammar_does() {
        let classifier = super::Classifier::default();
        for _ in 0..2 {
            let locks = classifier.effect(b"SELECT pg_advisory_lock(1)", || true);
            assert!(locks.is_some_and(|e| e.pins(reported)));
            let sums = classifier.effect(b"SELECT 1 + 1", || true);
            assert!(sums.is_none(), "no word, no parse");
            let sums = classifier.effect(b"SELECT abs(1)", || true);
            assert!(sums.is_some_and(|e| !e.pins(reported)));
        }
    }

    proptest::proptest! {
        /// The prefilter finds a word exactly where a plain case-blind
        /// search does, at any offset, the last bytes of a text included.
        #[test]
        fn the_prefilter_agrees_with_a_plain_search(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "set", "SeT", "se", "t", "do", "D", "(", "x", " ", "data", "BASE", "databasE",
                    "tem", "p", "into", "in", "hold", "call", "ca", "prepare", "load", "listen", "1",
                ]),
                0..12,
            ),
        ) {
            let text = pieces.concat().into_bytes();
            let lower = text.to_ascii_lowercase();
            let contains = |word: &[u8]| lower.windows(word.len()).any(|w| w == word);
            let words: [&[u8]; 11] = [
                b"set", b"listen", b"prepare", b"load", b"temp", b"hold", b"discard", b"do",
                b"call", b"into", b"(",
            ];
            proptest::prop_assert_eq!(WORDS.in_text(&text), words.iter().any(|w| contains(w)));
            proptest::prop_assert_eq!(DATABASE.in_text(&text), contains(b"database"));
            proptest::prop_assert_eq!(
                super::is_plain(&text),
                !words.iter().any(|w| contains(w)) && !contains(b"database")
            );
        }

        /// Random soups of SQL tokens, quotes and bytes never panic.
        #[test]
        fn token_soups_never_panic(
            tokens in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        "SET", "LISTEN", "DO", "$$", "$a$", "'", "\"", "E'", "\\", "/*", "*/", "--",
                        "(", ")", ";", "set_config", "pg_advisory_lock", "SELECT", "INTO", "TEMP",
                        "WITH", "HOLD", "CREATE", "TABLE", "pg_temp.", ",", "false", "$1", "\n",
                    ]).prop_map(str::to_string),
                    "[ -~]{0,6}",
                    proptest::collection::vec(proptest::num::u8::ANY, 0..4)
                        .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
                ],
                0..40,
            ),
            standard in proptest::bool::ANY,
        ) {
            let sql = tokens.join(" ");
            let _ = effect(sql.as_bytes(), standard);
            let _ = super::Classifier::default().effect(sql.as_bytes(), || standard);
        }
    }
}
