//! What a client asks its server session to be: the startup parameters
//! gatehouse applies on whichever server connection the client gets, and the
//! `options` settings.

/// Parameters a client's startup packet may set on its server session.
pub const SESSION_PARAMS: [&str; 5] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
];

/// What a client asked its server session to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Startup parameters among `SESSION_PARAMS`.
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
