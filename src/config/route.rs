//! The validated `[[routes]]` table: which requests each route matches
//! (a path prefix or a segment pattern, and methods) and what applies to them
//! (its rate limits, its cache TTL). Matching itself is the gateway's `route`
//! phase; this module only describes the routes.

use std::time::Duration;

use http::Method;

use super::Problems;
use super::ratelimit::{self, RatelimitConfig};
use super::raw::RawRoute;

/// A route: which requests it matches and what applies to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Used as the metric label, so it stays low-cardinality.
    pub name: String,
    pub path: PathMatch,
    /// Upper case; empty: every method.
    pub methods: Vec<Method>,
    pub cache_ttl: Option<Duration>,
    /// This route's rules, as indexes into `RatelimitConfig::endpoints`.
    pub limits: Vec<usize>,
}

/// How a route matches the decoded path (the bytes Django sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    /// Segments; `*` matches one segment, a final `**` any rest.
    Pattern(Vec<String>),
}

impl PathMatch {
    pub fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
            PathMatch::Pattern(segments) => {
                let path = path.strip_prefix(b"/").unwrap_or(path);
                let mut parts = path.split(|b| *b == b'/');
                for segment in segments {
                    if segment == "**" {
                        return true;
                    }
                    match parts.next() {
                        Some(part) if segment == "*" || segment.as_bytes() == part => {}
                        _ => return false,
                    }
                }
                parts.next().is_none()
            }
        }
    }

    /// How specific the match is: patterns before prefixes, then longer first.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            PathMatch::Pattern(_) => (1, 0),
            PathMatch::Prefix(prefix) => (0, prefix.len()),
        }
    }
}

fn path_match(key: &str, raw: &RawRoute, problems: &mut Problems) -> PathMatch {
    match (&raw.path_prefix, &raw.path_pattern) {
        (Some(prefix), None) if prefix.starts_with('/') => PathMatch::Prefix(prefix.clone()),
        (None, Some(pattern)) if pattern.starts_with('/') => PathMatch::Pattern(
            pattern
                .trim_start_matches('/')
                .split('/')
                .map(str::to_string)
                .collect(),
        ),
        (Some(_), Some(_)) => {
            problems.push((
                format!("{key}.path_pattern"),
                "give path_prefix or path_pattern, not both".into(),
            ));
            PathMatch::Prefix("/".into())
        }
        (None, None) => {
            problems.push((
                format!("{key}.path_prefix"),
                "a route needs path_prefix or path_pattern".into(),
            ));
            PathMatch::Prefix("/".into())
        }
        _ => {
            let which = if raw.path_prefix.is_some() {
                "path_prefix"
            } else {
                "path_pattern"
            };
            problems.push((format!("{key}.{which}"), "must start with `/`".into()));
            PathMatch::Prefix("/".into())
        }
    }
}

/// Validate every route, and put each route's limits into
/// `ratelimit.endpoints`, where the limiter finds them by index.
pub fn validate(
    raw: &[RawRoute],
    ratelimit: &mut RatelimitConfig,
    problems: &mut Problems,
) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("routes[{i}]");
        super::check_name(&format!("{key}.name"), &r.name, problems);
        let path = path_match(&key, r, problems);
        let methods = super::parse_methods(&key, &r.methods, problems);
        // A duplicate rule makes a config silently ambiguous (envoy #14232).
        if routes.iter().any(|o| o.name == r.name) {
            problems.push((format!("{key}.name"), format!("`{}` is used twice", r.name)));
        } else if routes
            .iter()
            .any(|o| o.path == path && o.methods == methods)
        {
            let which = if r.path_prefix.is_some() {
                "path_prefix"
            } else {
                "path_pattern"
            };
            problems.push((
                format!("{key}.{which}"),
                "another route has the same path and methods".into(),
            ));
        }
        let mut limits = Vec::new();
        for (j, raw_limit) in r.limits.iter().enumerate() {
            let limit_key = format!("{key}.limits[{j}]");
            let rule = ratelimit::endpoint(&limit_key, &r.name, raw_limit, ratelimit, problems);
            if ratelimit::RESERVED_RULES.contains(&rule.name.as_str())
                || ratelimit.endpoints.iter().any(|o| o.name == rule.name)
            {
                let message = if raw_limit.name.is_some() {
                    format!("`{}` is already a rule name", rule.name)
                } else {
                    format!(
                        "`{}` is already a rule name: give this limit a `name`",
                        rule.name
                    )
                };
                problems.push((format!("{limit_key}.name"), message));
            }
            limits.push(ratelimit.endpoints.len());
            ratelimit.endpoints.push(rule);
        }
        routes.push(Route {
            name: r.name.clone(),
            path,
            methods,
            cache_ttl: r.cache_ttl,
            limits,
        });
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::PathMatch;

    #[test]
    fn patterns_match_whole_segments() {
        let p = |s: &str| {
            PathMatch::Pattern(
                s.trim_start_matches('/')
                    .split('/')
                    .map(String::from)
                    .collect(),
            )
        };
        assert!(p("/v1/stories/*/").matches(b"/v1/stories/12/"));
        assert!(!p("/v1/stories/*/").matches(b"/v1/stories/12/comments/"));
        assert!(p("/v1/stories/*/**").matches(b"/v1/stories/12/comments/3/"));
        assert!(!p("/v1/stories/*/").matches(b"/v1/users/12/"));
        assert!(PathMatch::Prefix("/v1/".into()).matches(b"/v1/x"));
    }
}
