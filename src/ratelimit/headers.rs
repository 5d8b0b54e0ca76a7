//! How a decision reaches the client: the IETF `RateLimit-Policy` and
//! `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers), optionally the
//! legacy `X-RateLimit-*` trio, and the 429 with `Retry-After`.

use http::{HeaderMap, HeaderValue, StatusCode};

use super::RuleReport;

/// Add the fields describing `report` to `headers`.
pub fn apply(headers: &mut HeaderMap, report: &RuleReport, legacy: bool) {
    let policy = format!(
        "\"{}\";q={};w={}",
        report.rule, report.limit, report.window_secs
    );
    let state = format!(
        "\"{}\";r={};t={}",
        report.rule, report.remaining, report.reset_secs
    );
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_str(&state) {
        headers.insert("ratelimit", v);
    }
    if legacy {
        headers.insert("x-ratelimit-limit", HeaderValue::from(report.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(report.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(report.reset_secs));
    }
}

/// The status and detail of a refusal.
pub fn refusal(report: &RuleReport) -> (StatusCode, String) {
    (
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "rate limit `{}` ({} per {} s) exceeded; retry in {} s",
            report.rule, report.limit, report.window_secs, report.reset_secs
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_follow_the_draft() {
        let mut headers = HeaderMap::new();
        let report = RuleReport {
            rule: "per_user".into(),
            limit: 100,
            window_secs: 60,
            remaining: 0,
            reset_secs: 17,
        };
        apply(&mut headers, &report, true);
        assert_eq!(headers["ratelimit-policy"], "\"per_user\";q=100;w=60");
        assert_eq!(headers["ratelimit"], "\"per_user\";r=0;t=17");
        assert_eq!(headers["x-ratelimit-reset"], "17");
    }
}
