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

/// Whether `sql` (one or more statements) changes session state.
pub fn pins_session(sql: &[u8]) -> bool {
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

#[cfg(test)]
mod tests {
    use super::pins_session;

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
