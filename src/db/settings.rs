//! What a client asks its server session to be: the startup parameters and
//! reported settings gatehouse applies on whichever server connection the
//! client gets, and the `options` settings.

/// Parameters a client's startup packet may set on its server session.
pub const SESSION_PARAMS: [&str; 5] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
];

/// Settings the server reports that a client cannot carry to another
/// connection: fixed by the server, or who the session is.
const UNTRACKED: [&str; 6] = [
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
    "session_authorization",
];

/// Whether a setting the server reports (`ParameterStatus`) is carried for
/// the client from one server connection to the next, like a startup
/// parameter: `TimeZone`, `DateStyle`, `application_name`, and every other
/// reported setting a client may change.
pub fn tracked(name: &str) -> bool {
    !UNTRACKED.iter().any(|u| u.eq_ignore_ascii_case(name))
}

/// Set `name` to `value` in a list of settings (names ignore case).
pub fn upsert(list: &mut Vec<(String, String)>, name: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
        Some(slot) => value.clone_into(&mut slot.1),
        None => list.push((name.to_string(), value.to_string())),
    }
}

/// The value of `name` in a list of settings (names ignore case).
pub fn lookup<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// What a client asked its server session to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Reported settings: startup parameters among `SESSION_PARAMS`, then
    /// what the client changed (`SET TimeZone`, `set_config`), as the
    /// server reported it.
    pub params: Vec<(String, String)>,
    /// `-c name=value` settings from the startup `options`.
    pub options: Vec<(String, String)>,
}

/// `-c name=value` and `--name=value` settings from a startup `options`.
pub fn settings_of(options: &str) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let setting = match word {
            "-c" => words.next(),
            w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")),
        };
        if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_string()));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::{lookup, settings_of, tracked, upsert};

    #[test]
    fn options_settings() {
        assert_eq!(
            settings_of("-c statement_timeout=5000 --search-path=app -cwork_mem=64MB"),
            [
                ("statement_timeout".to_string(), "5000".to_string()),
                ("search_path".to_string(), "app".to_string()),
                ("work_mem".to_string(), "64MB".to_string()),
            ]
        );
    }

    #[test]
    fn settings_are_found_and_set_whatever_the_case() {
        let mut list = vec![("TimeZone".to_string(), "UTC".to_string())];
        upsert(&mut list, "timezone", "Asia/Tokyo");
        upsert(&mut list, "DateStyle", "ISO, DMY");
        assert_eq!(lookup(&list, "TIMEZONE"), Some("Asia/Tokyo"));
        assert_eq!(list.len(), 2);
        assert!(tracked("TimeZone") && tracked("application_name"));
        assert!(!tracked("server_version") && !tracked("is_superuser"));
        assert!(!tracked("session_authorization"));
    }
}
