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
    pub cache: RouteCache,
}

/// What the response cache does on a route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteCache {
    /// GET/HEAD responses are looked up and stored.
    pub enabled: bool,
    /// Credentialed requests are cached too, keyed on the verified subject.
    pub per_user: bool,
    /// Tags every entry stored from this route carries.
    pub tags: Vec<TagTemplate>,
    /// Tags a successful write through this route invalidates.
    pub invalidates: Vec<TagTemplate>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
}

/// A tag with `{name}` holes filled from the matched path's segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate(Vec<TagPart>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagPart {
    Text(String),
    /// The index of a `{name}` segment in the route's pattern.
    Segment(usize),
}

impl TagTemplate {
    fn parse(text: &str, path: &PathMatch) -> Result<TagTemplate, String> {
        if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!("`{text}`: a tag is not empty and has no spaces"));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TagPart::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{text}`: `{{` without `}}`"));
            };
            let name = &rest[open + 1..open + close];
            let index = match path {
                PathMatch::Pattern(segments) => {
                    segments.iter().position(|s| segment_name(s) == Some(name))
                }
                PathMatch::Prefix(_) => None,
            };
            let Some(index) = index else {
                return Err(format!(
                    "`{text}`: the route's path_pattern has no segment `{{{name}}}`"
                ));
            };
            parts.push(TagPart::Segment(index));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TagPart::Text(rest.to_string()));
        }
        Ok(TagTemplate(parts))
    }

    /// The tag for a request whose decoded path matched the route.
    pub fn render(&self, path: &[u8]) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                TagPart::Text(text) => out.push_str(text),
                TagPart::Segment(i) => {
                    let segment = path
                        .strip_prefix(b"/")
                        .unwrap_or(path)
                        .split(|b| *b == b'/')
                        .nth(*i)
                        .unwrap_or_default();
                    out.push_str(&String::from_utf8_lossy(segment));
                }
            }
        }
        out
    }
}

/// `id` for a pattern segment `{id}`.
fn segment_name(segment: &str) -> Option<&str> {
    segment.strip_prefix('{')?.strip_suffix('}')
}

/// How a route matches the decoded path (the bytes Django sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    /// Segments; `*` or `{name}` matches one segment, a final `**` any rest.
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
                        Some(part)
                            if segment == "*"
                                || segment.as_bytes() == part
                                || segment_name(segment).is_some() && !part.is_empty() => {}
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
        let templates = |field: &str, list: &[String], problems: &mut Problems| {
            let mut out = Vec::new();
            for (j, text) in list.iter().enumerate() {
                match TagTemplate::parse(text, &path) {
                    Ok(t) => out.push(t),
                    Err(e) => problems.push((format!("{key}.{field}[{j}]"), e)),
                }
            }
            out
        };
        let tags = templates("tags", &r.tags, problems);
        let invalidates = match &r.invalidates {
            Some(list) => templates("invalidates", list, problems),
            None => tags.clone(),
        };
        if r.cache_ttl.is_some_and(|t| t.is_zero()) {
            problems.push((
                format!("{key}.cache_ttl"),
                "must be greater than zero; set `cache = false` to not cache".into(),
            ));
        }
        routes.push(Route {
            name: r.name.clone(),
            path,
            methods,
            cache_ttl: r.cache_ttl,
            limits,
            cache: RouteCache {
                enabled: r.cache,
                per_user: r.per_user,
                tags,
                invalidates,
                stale_while_revalidate: r.stale_while_revalidate,
                stale_if_error: r.stale_if_error,
            },
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
