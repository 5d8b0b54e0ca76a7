//! The `route` phase: match a request to an endpoint rule from the config
//! (longest path prefix, then method). The rule's name labels metrics; limits
//! and cache settings hang off it.

use http::Method;

use crate::config::Route;

/// The name of requests no rule matches.
pub const DEFAULT_ROUTE: &str = "default";

pub struct RouteTable {
    /// Longest prefix first, so the first match is the most specific.
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by(|a, b| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                // A rule naming methods is more specific than one for all.
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        RouteTable { routes }
    }

    pub fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            path.starts_with(&r.path_prefix) && (r.methods.is_empty() || r.methods.contains(method))
        })
    }

    pub fn name_of(&self, method: &Method, path: &str) -> &str {
        self.find(method, path).map_or(DEFAULT_ROUTE, |r| &r.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, methods: &[Method]) -> Route {
        Route {
            name: name.into(),
            path_prefix: prefix.into(),
            methods: methods.to_vec(),
            cache_ttl: None,
        }
    }

    #[test]
    fn longest_prefix_then_method_wins() {
        let table = RouteTable::new(&[
            route("v1", "/v1/", &[]),
            route("stories", "/v1/stories/", &[]),
            route("stories-write", "/v1/stories/", &[Method::POST]),
        ]);
        assert_eq!(table.name_of(&Method::GET, "/v1/stories/3/"), "stories");
        assert_eq!(
            table.name_of(&Method::POST, "/v1/stories/"),
            "stories-write"
        );
        assert_eq!(table.name_of(&Method::GET, "/v1/users/1/"), "v1");
        assert_eq!(table.name_of(&Method::GET, "/admin/"), DEFAULT_ROUTE);
    }
}
