//! An operator's config file: any text gives a config or located problems,
//! never a panic.
#![no_main]

use gatehouse::config::{Config, EnvSource, Overrides};
use libfuzzer_sys::fuzz_target;

struct NoEnv;

impl EnvSource for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::from_text("fuzz.toml", text, &Overrides::default(), &NoEnv) {
            let _ = e.to_string();
        }
    }
});
