//! What a statement means for pooling. For now one question: does it leave
//! state on the server session that would leak to the next client of a
//! transaction-pooled connection (`SET`, `LISTEN`, session advisory locks,
//! temporary tables, `WITH HOLD` cursors, SQL `PREPARE`, `set_config`)?
//! Such a client is pinned to its server connection until it leaves
//! (pgbouncer #396, #452: state leaked across clients). The check is
//! deliberately broad: a false positive costs pooling, a false negative leaks.
//! Read/write routing (with the PostgreSQL grammar) will live here too.

/// Lowercased text with comments and string literals blanked, so that
/// keywords inside them do not count.
fn normalise(sql: &[u8]) -> String {
    let text = String::from_utf8_lossy(sql).to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // Skip a literal; '' inside it is an escaped quote.
                while let Some(d) = chars.next() {
                    if d == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
                out.push_str("''");
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
                out.push(' ');
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                for d in chars.by_ref() {
                    if previous == '*' && d == '/' {
                        break;
                    }
                    previous = d;
                }
                out.push(' ');
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether any of `words` (lowercase ASCII) occurs in `text`, ignoring
/// case: one pass, comparing only where a word's first letter is.
fn mentions_any(text: &[u8], words: &[&[u8]]) -> bool {
    let mut first = [false; 128];
    for word in words {
        first[usize::from(word[0] & 0x7f)] = true;
    }
    (0..text.len()).any(|i| {
        let c = text[i].to_ascii_lowercase();
        first[usize::from(c & 0x7f)]
            && words.iter().any(|word| {
                word[0] == c
                    && text
                        .get(i..i + word.len())
                        .is_some_and(|w| w.eq_ignore_ascii_case(word))
            })
    })
}

/// Whether `sql` (one or more statements) changes session state.
pub fn pins_session(sql: &[u8]) -> bool {
    // Every statement below holds one of these words: most queries are
    // cleared without the full scan.
    const WORDS: [&[u8]; 8] = [
        b"discard",
        b"set",
        b"listen",
        b"prepare",
        b"load",
        b"temp",
        b"hold",
        b"advisory",
    ];
    if !mentions_any(sql, &WORDS) {
        return false;
    }
    let text = normalise(sql);
    const ANYWHERE: [&str; 6] = [
        "pg_advisory_lock(",
        "pg_advisory_lock_shared(",
        "pg_try_advisory_lock(",
        "pg_try_advisory_lock_shared(",
        "set_config(",
        " with hold",
    ];
    if ANYWHERE.iter().any(|p| text.contains(p)) {
        return true;
    }
    text.split(';').any(|statement| {
        let words: Vec<&str> = statement.split_whitespace().collect();
        match words.as_slice() {
            // SET LOCAL and SET TRANSACTION end with the transaction.
            ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => false,
            ["set", ..] | ["reset", ..] | ["listen", ..] | ["prepare", ..] | ["load", ..] => true,
            // Also resets the settings gatehouse applied for the client.
            ["discard", ..] => true,
            ["create", "temp" | "temporary", ..]
            | ["create", "local" | "global", "temp" | "temporary", ..] => true,
            ["create", "unlogged" | "table", ..] => {
                statement.contains(" temp ") || statement.contains(" temporary ")
            }
            ["declare", ..] => statement.contains(" hold"),
            _ => false,
        }
    })
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
    use super::{deallocates, deallocates_all, discards_all, pins_session};

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

    #[test]
    fn session_state_pins() {
        for sql in [
            "SET search_path TO app",
            "set statement_timeout = 0",
            "BEGIN; SET work_mem = '64MB'; COMMIT",
            "RESET ALL",
            "LISTEN jobs",
            "SELECT pg_advisory_lock(42)",
            "select set_config('search_path', 'x', false)",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t (x int)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE q AS SELECT 1",
            "/* hi */ SET x.y = 1",
            "DISCARD ALL",
        ] {
            assert!(pins_session(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn ordinary_statements_do_not() {
        for sql in [
            "SELECT 1",
            "BEGIN; SET LOCAL statement_timeout = 100; SELECT 1; COMMIT",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT pg_advisory_xact_lock(42)",
            "INSERT INTO notes (body) VALUES ('please SET the table; LISTEN up')",
            "UPDATE t SET x = 1 -- and SET y\n",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE TABLE t (x int)",
        ] {
            assert!(!pins_session(sql.as_bytes()), "{sql}");
        }
    }
}
