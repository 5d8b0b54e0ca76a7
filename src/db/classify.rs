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
/// calls a function (`(`): most queries are cleared without a parse. They
/// are looked for where a token can start, so each keyword is here as the
/// token it is (`reset`, not the `set` inside it), and so are the names that
/// make a relation temporary without `TEMP`: the `pg_temp` schema, also
/// spelled with Unicode escapes (`U&"pg\005ftemp"`).
const SESSION_WORDS: &[&[u8]] = &[
    b"set", b"reset", b"listen", b"prepare", b"load", b"temp", b"hold", b"discard", b"do", b"call",
    b"into", b"(", b"pg_temp", b"u&\"",
];

/// Every word a statement's text is looked at for, in one pass ([`scan`]):
/// [`SESSION_WORDS`], then `database` ([`databases_needing_no_sessions`]),
/// then `set_config`, whose literals matter ([`cache_key`]).
static ALL: Words = Words::new(&[SESSION_WORDS, &[b"database", b"set_conf"]]);

/// The session words' bits in [`Found`].
const SESSION: u16 = (1 << SESSION_WORDS.len()) - 1;
/// `database`'s bit.
const DATABASE_WORD: u16 = 1 << SESSION_WORDS.len();
/// The words that make literals matter: `set_config` and `u&"` (which is
/// also a session word: an identifier with Unicode escapes may spell it).
const LITERALS_MATTER: u16 = 1 << (SESSION_WORDS.len() + 1) | 1 << (SESSION_WORDS.len() - 1);
const _: () = {
    let last = SESSION_WORDS[SESSION_WORDS.len() - 1];
    assert!(last.len() == 3 && last[0] == b'u' && last[1] == b'&' && last[2] == b'"');
};

/// Which of the words a text holds where a token can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found(u16);

impl Found {
    /// None: the text can change no session and name no database.
    pub fn nothing(self) -> bool {
        self.0 == 0
    }

    /// A word that names a database (`DROP DATABASE`, …).
    pub fn database(self) -> bool {
        self.0 & DATABASE_WORD != 0
    }
}

/// The words `sql` holds, in one pass.
pub fn scan(sql: &[u8]) -> Found {
    Found(ALL.found(sql))
}

/// Up to 16 words of at most 8 bytes, looked for in a text where a token
/// can start, ignoring case. A prefilter: a false match only costs a parse.
struct Words {
    /// Each word as a little-endian integer of its bytes with bit 5 set,
    /// and the mask of its length.
    words: [(u64, u64); 16],
    /// For each byte, the words that start with it in either case, as a
    /// bit set of their indexes, and [`IDENTIFIER`] if it continues an
    /// identifier.
    bytes: [u32; 256],
}

/// In [`Words::bytes`]: the byte continues an identifier
/// ([`continues_identifier`]).
const IDENTIFIER: u32 = 1 << 16;

impl Words {
    const fn new(lists: &[&[&[u8]]]) -> Words {
        let mut words = [(0u64, 0u64); 16];
        let mut bytes = [0u32; 256];
        let mut byte = 0;
        while byte < 256 {
            if continues_identifier(byte as u8) {
                bytes[byte] = IDENTIFIER;
            }
            byte += 1;
        }
        let mut i = 0;
        let mut list = 0;
        while list < lists.len() {
            let mut k = 0;
            while k < lists[list].len() {
                let word = lists[list][k];
                assert!(word.len() <= 8 && i < 16);
                let mut j = 0;
                while j < word.len() {
                    words[i].0 |= ((word[j] | 0x20) as u64) << (8 * j);
                    words[i].1 |= 0xff << (8 * j);
                    j += 1;
                }
                bytes[word[0] as usize] |= 1 << i;
                bytes[word[0].to_ascii_uppercase() as usize] |= 1 << i;
                i += 1;
                k += 1;
            }
            list += 1;
        }
        Words { words, bytes }
    }

    /// Every word found where a token can start, as a bit set. One table
    /// load per byte, and only at a byte that does not continue an identifier
    /// or at the first byte of one are the words that start with it
    /// compared: inside `pgbench_accounts` or `OFFSET` nothing is.
    fn found(&self, text: &[u8]) -> u16 {
        let mut found = 0;
        // IDENTIFIER when the byte before continues an identifier.
        let mut within = 0;
        for (i, &c) in text.iter().enumerate() {
            let entry = self.bytes[usize::from(c)];
            // Both this byte and the one before continue an identifier:
            // nothing starts here.
            if entry & within == 0 && entry as u16 & !found != 0 {
                found |= self.at(text, i, entry as u16 & !found);
            }
            within = entry & IDENTIFIER;
        }
        found
    }

    /// Which of `candidates` start at `text[i]`: eight bytes compared at
    /// once with bit 5 set in each (ASCII letters in lowercase).
    #[inline(never)]
    fn at(&self, text: &[u8], i: usize, mut candidates: u16) -> u16 {
        // One load of eight bytes; only the last seven bytes of a text need
        // a padded copy.
        let mut window = [0u8; 8];
        match text.get(i..i + 8) {
            Some(eight) => window.copy_from_slice(eight),
            None => {
                let rest = &text[i..];
                window[..rest.len()].copy_from_slice(rest);
            }
        }
        let window = u64::from_le_bytes(window) | 0x2020_2020_2020_2020;
        let mut found = 0;
        while candidates != 0 {
            let index = candidates.trailing_zeros();
            let (word, mask) = self.words[index as usize];
            // A word longer than what is left meets bytes past the end,
            // which became spaces: no letter matches them.
            if window & mask == word {
                found |= 1 << index;
            }
            candidates &= candidates - 1;
        }
        found
    }
}

/// Whether a byte after an identifier's byte belongs to the same token:
/// PostgreSQL's identifiers go on with letters, `_` and any byte above 127
/// (in every client encoding a multibyte character is an identifier's
/// character, whatever its trailing bytes look like). Digits and `$` do not
/// count here, although identifiers may hold them: a keyword may follow a
/// number (`1set` on servers before 15), a parameter (`$1set`) or the end of
/// a dollar quote (`$$set`), so after them it is looked for too.
const fn continues_identifier(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80
}

/// Statements classified recently, by their shape: clients repeat the same
/// few statements, with parameters or with their literals written in
/// (psycopg's client-side binding, which Django uses by default).
pub struct Classifier {
    known: Mutex<HashMap<Box<[u8]>, Arc<Effect>>>,
}

/// How many shapes the cache holds before it starts again.
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
        self.effect_of(sql, scan(sql), standard_strings)
    }

    /// [`Classifier::effect`], for a text already [`scan`]ned.
    pub fn effect_of(
        &self,
        sql: &[u8],
        found: Found,
        standard_strings: impl FnOnce() -> bool,
    ) -> Option<Arc<Effect>> {
        if found.0 & SESSION == 0 {
            return None;
        }
        let standard_strings = standard_strings();
        if sql.len() > CACHED_LEN {
            return Some(Arc::new(effect(sql, standard_strings)));
        }
        let key = cache_key(sql, found, standard_strings);
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

/// The classifier's key for `sql`: its shape (every string and number literal
/// replaced, [`access::shape_key`]) where no literal's value can change its
/// effect, which is so for everything but `set_config`'s name and scope (a
/// setting's value is the server's to report), in a text that names it or
/// holds an identifier with Unicode escapes, which may spell it ([`Found`]).
/// Otherwise, or for a text the shape's lexer does not follow to its end,
/// the text itself, marked apart.
fn cache_key(sql: &[u8], found: Found, standard_strings: bool) -> Vec<u8> {
    if found.0 & LITERALS_MATTER == 0 {
        if let Some(shape) = access::shape_key(sql, standard_strings) {
            return shape;
        }
    }
    let mut key = Vec::with_capacity(sql.len() + 1);
    key.push(2 + u8::from(standard_strings));
    key.extend_from_slice(sql);
    key
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
    if sql.len() > PARSED_LEN || !scan(sql).database() {
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
    use super::{deallocates, deallocates_all, discards_all, effect};
    use proptest::prelude::Strategy;

    /// Whether the one-pass scan finds a session word in `text`.
    fn session_word(text: &[u8]) -> bool {
        super::scan(text).0 & super::SESSION != 0
    }

    #[test]
    fn the_prefilter_finds_its_words_in_any_case_where_a_token_starts() {
        for text in [
            &b"SET x = 1"[..],
            b"select 1; reset all",
            b"select 1;reset all",
            b"LiStEn ch",
            b"select f(1)",
            b"select count(*)",
            b"x(",
            b"DISCARD",
            b"abc do",
            b"select 1/*c*/set",
            b"select 1set",
            b"select $1set",
            b"select $$a$$set",
            b"select \"x\"set",
            b"create table pg_temp.t as select 1",
            b"create table \"PG_TEMP_3\".t as select 1",
            b"create table u&\"pg\\005ftemp\".t as select 1",
            b"UPDATE t SET", // the word ends the text
        ] {
            assert!(session_word(text), "{}", String::from_utf8_lossy(text));
        }
        for text in [
            &b"SELECT abalance FROM pgbench_accounts WHERE aid = 42"[..],
            b"SELECT * FROM t ORDER BY id LIMIT 21 OFFSET 40",
            b"SELECT onset, preset_at, \xc3\xa9set FROM t_temp",
            b"",
            b"se",
        ] {
            assert!(!session_word(text), "{}", String::from_utf8_lossy(text));
        }
        assert!(super::scan(b"drop DataBase x").database());
        assert!(!super::scan(b"drop databas").database());
        assert!(!super::scan(b"select my_database from t").database());
    }

    /// The prefilter never clears a statement that the grammar says changes
    /// the session, however it is spaced, cased or glued to what is before
    /// and after it.
    #[test]
    fn the_prefilter_passes_every_statement_that_changes_the_session() {
        let statements = [
            "SET x = 1",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "RESET x",
            "RESET ALL",
            "LISTEN c",
            "PREPARE p AS SELECT 1",
            "LOAD 'x'",
            "CREATE TEMP TABLE t (a int)",
            "CREATE TEMPORARY TABLE t AS SELECT 1",
            "CREATE TABLE pg_temp.t AS SELECT 1",
            "CREATE VIEW pg_temp_3.v AS SELECT 1",
            "CREATE TABLE \"pg_temp\".t AS SELECT 1",
            "CREATE TABLE U&\"pg\\005ftemp\".t AS SELECT 1",
            "SELECT 1 INTO TEMP t",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DISCARD ALL",
            "DO $$BEGIN END$$",
            "CALL p()",
            "SELECT f()",
            "SELECT pg_advisory_lock(1)",
        ];
        let before = [
            "",
            " ",
            "SELECT 1;",
            "SELECT 1 ;",
            "/*c*/",
            "--c\n",
            "SELECT $$x$$;",
        ];
        for statement in statements {
            for case in [str::to_string, str::to_ascii_lowercase] {
                for prefix in before {
                    let sql = format!("{prefix}{}", case(statement));
                    assert_ne!(effect(sql.as_bytes(), true), super::Effect::NONE, "{sql}");
                    assert!(session_word(sql.as_bytes()), "{sql}");
                }
            }
        }
    }

    #[test]
    fn one_pass_finds_every_word_a_text_holds() {
        let found = super::scan(b"SELECT set_config('a', 'b', false); DROP DATABASE x");
        assert!(found.database() && !found.nothing());
        // `set` (the start of `set_config`) and `(`.
        assert_eq!(found.0 & super::SESSION, 1 | 1 << 11);
        assert_ne!(found.0 & super::LITERALS_MATTER, 0);
        let found = super::scan(br#"SELECT U&"a" FROM t"#);
        assert!(!found.database());
        assert_ne!(found.0 & super::LITERALS_MATTER, 0);
        assert_ne!(found.0 & super::SESSION, 0);
        assert!(super::scan(b"SELECT a FROM t WHERE id = 1 OFFSET 5").nothing());
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

    #[test]
    fn statements_that_differ_only_in_literals_share_one_classification() {
        let classifier = super::Classifier::default();
        let first = classifier.effect(b"SELECT a FROM t WHERE id IN (1) AND b = 'x'", || true);
        let again = classifier.effect(b"SELECT a FROM t WHERE id IN (22) AND b = 'y''z'", || true);
        let (Some(first), Some(again)) = (first, again) else {
            panic!("'(' makes both worth a look");
        };
        assert!(std::sync::Arc::ptr_eq(&first, &again), "one parse for both");
        assert!(!again.pins(reported));
        // The same shape in the other string mode is another entry.
        let other = classifier.effect(b"SELECT a FROM t WHERE id IN (1) AND b = 'x'", || false);
        assert!(other.is_some_and(|e| !std::sync::Arc::ptr_eq(&first, &e)));
    }

    #[test]
    fn set_config_is_classified_by_its_literals() {
        let classifier = super::Classifier::default();
        for (sql, setting, scope_known) in [
            (
                &b"SELECT set_config('TimeZone', 'UTC', false) FROM t WHERE id = 1"[..],
                "timezone",
                true,
            ),
            (
                b"SELECT set_config('work_mem', '1MB', false) FROM t WHERE id = 2",
                "work_mem",
                true,
            ),
            (
                b"SELECT set_config('work_mem', '1MB', 'off') FROM t WHERE id = 2",
                "work_mem",
                true,
            ),
            (
                b"SELECT set_config('work_mem', '1MB', true) FROM t WHERE id = 2",
                "",
                true,
            ),
            (
                b"SELECT set_config('work_mem', '1MB', 'maybe') FROM t WHERE id = 2",
                "",
                false,
            ),
            (
                br#"SELECT U&"set\005fconfig"('TimeZone', 'UTC', false) FROM t WHERE id = 3"#,
                "timezone",
                true,
            ),
            (
                br#"SELECT U&"set\005fconfig"('work_mem', '1MB', false) FROM t WHERE id = 4"#,
                "work_mem",
                true,
            ),
        ] {
            let cached = classifier.effect(sql, || true);
            let text = String::from_utf8_lossy(sql);
            assert_eq!(cached.as_deref(), Some(&effect(sql, true)), "{text}");
            let cached = cached.unwrap_or_default();
            if !scope_known {
                assert!(cached.session.is_some(), "{text}");
            } else if setting.is_empty() {
                assert_eq!(*cached, super::Effect::NONE, "{text}");
            } else {
                assert_eq!(cached.settings, [setting], "{text}");
            }
        }
    }

    /// Every pair of tricky literals around every piece of code, in both
    /// string modes, through one cache: wherever the shape's lexer and the
    /// grammar disagreed on where a literal ends, code would be swallowed
    /// into a `?` and two statements with different effects would share a
    /// shape.
    #[test]
    fn no_two_statements_of_one_shape_differ_in_effect() {
        let contents = [
            "", "'", "''", "\\", "\\'", "\\\\'", "$$", "$q$", "--", "/*", "*/", "a\nb",
        ];
        let codes = [
            ", lower(1),",
            "; SET x = 1; SELECT",
            "; SELECT pg_advisory_lock(1); SELECT",
            "/* ; SET x = 1; */ ,",
            ", $q$ ; SET x = 1; $q$ ,",
            "; LISTEN c; SELECT",
        ];
        let templates = [
            "SELECT {} {code} {}",
            "SELECT {} {code} E{}",
            "SELECT f({}) {code} {}",
        ];
        for standard in [true, false] {
            let classifier = super::Classifier::default();
            let literal = |content: &str, dollar: bool| {
                if dollar {
                    format!("$z${content}$z$")
                } else if standard {
                    format!("'{}'", content.replace('\'', "''"))
                } else {
                    format!("'{}'", content.replace('\\', "\\\\").replace('\'', "\\'"))
                }
            };
            for template in templates {
                for code in codes {
                    for first in contents {
                        for second in contents {
                            for dollar in [false, true] {
                                let sql = template
                                    .replace("{code}", code)
                                    .replacen("{}", &literal(first, dollar), 1)
                                    .replacen("{}", &literal(second, false), 1);
                                let expected = effect(sql.as_bytes(), standard);
                                let cached = classifier.effect(sql.as_bytes(), || standard);
                                assert_eq!(
                                    cached.as_deref(),
                                    Some(&expected),
                                    "{sql} (standard_conforming_strings {standard})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever a literal holds (quotes, backslashes, dollar quotes,
        /// comments, statements) and whatever stands between literals, a
        /// statement classified after others gets the effect the grammar
        /// gives it: a shared shape never hides a difference.
        #[test]
        fn a_cached_shape_answers_as_the_grammar_does(
            statements in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "SELECT a FROM t WHERE b = {} AND c IN (1)",
                        "SELECT lower({}); SELECT 1",
                        "SET application_name = {}",
                        "SELECT {}::text, f(2)",
                        "SELECT E{} , count(*)",
                        "SELECT {} -- (\nSET x = 1",
                        "SELECT pg_advisory_lock(7), {}",
                        "SELECT set_config({}, 'x', false)",
                        "SELECT set_config('work_mem', {}, {})",
                        "DO {}",
                        "SELECT {} {code} {}",
                        "SELECT {} {code} E{}",
                        "SELECT abs({}) {code} {}",
                    ]),
                    proptest::sample::select(vec![
                        ", 1,", "; SET x = 1; SELECT", "; SELECT pg_advisory_lock(1); SELECT",
                        ", lower(1),", "/* ; SET x = 1; */ ,", ", $q$ ; SET x = 1; $q$ ,",
                        "; LISTEN c; SELECT", ",",
                    ]),
                    proptest::collection::vec(
                        proptest::collection::vec(
                            proptest::sample::select(vec![
                                "a", "'", "\\", "\\'", "$$", "$q$", "--", "/*", "*/", "\n",
                                "SET x = 1; ", "(", "false",
                            ]),
                            0..4,
                        )
                        .prop_map(|pieces| pieces.concat()),
                        2,
                    ),
                    proptest::bool::ANY,
                ),
                2..8,
            ),
            standard in proptest::bool::ANY,
        ) {
            let classifier = super::Classifier::default();
            for (template, code, contents, dollar) in &statements {
                // Each literal written as the client would write it.
                let literal = |content: &String| {
                    if *dollar && !content.contains("$z$") {
                        format!("$z${content}$z$")
                    } else if standard {
                        format!("'{}'", content.replace('\'', "''"))
                    } else {
                        format!("'{}'", content.replace('\\', "\\\\").replace('\'', "\\'"))
                    }
                };
                let sql = template
                    .replace("{code}", code)
                    .replacen("{}", &literal(&contents[0]), 1)
                    .replacen("{}", &literal(&contents[1]), 1);
                let expected = effect(sql.as_bytes(), standard);
                let cached = classifier.effect(sql.as_bytes(), || standard);
                if let Some(cached) = cached {
                    proptest::prop_assert_eq!(&*cached, &expected, "{}", sql);
                } else {
                    // No word, no parse: a text the server cannot read either
                    // changes nothing.
                    proptest::prop_assert!(
                        !expected.pins(|_| false) || expected.session == Some("not parsed"),
                        "{}",
                        sql
                    );
                }
            }
        }

        /// The prefilter finds a word exactly where a plain case-blind
        /// search at each token's start does, at any offset, the last bytes
        /// of a text included.
        #[test]
        fn the_prefilter_agrees_with_a_plain_search(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "set", "SeT", "se", "t", "do", "D", "(", "x", " ", "data", "BASE", "databasE",
                    "tem", "p", "into", "in", "hold", "call", "ca", "prepare", "load", "listen", "1",
                    "re", "_", "$", "pg_", "u&", "\"", "\u{e9}",
                ]),
                0..12,
            ),
        ) {
            let text = pieces.concat().into_bytes();
            let lower = text.to_ascii_lowercase();
            let identifier = |b: u8| b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
            let starts = |i: usize| i == 0 || !identifier(lower[i - 1]) || !identifier(lower[i]);
            let contains =
                |word: &[u8]| (0..lower.len()).any(|i| starts(i) && lower[i..].starts_with(word));
            let words = super::SESSION_WORDS;
            proptest::prop_assert_eq!(session_word(&text), words.iter().any(|w| contains(w)));
            proptest::prop_assert_eq!(super::scan(&text).database(), contains(b"database"));
            proptest::prop_assert_eq!(
                super::scan(&text).nothing(),
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
