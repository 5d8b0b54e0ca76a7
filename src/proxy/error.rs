//! Errors on the request path, classified by side, and their one mapping to
//! an HTTP status and an `application/problem+json` body (RFC 9457).

use http::{HeaderValue, Response, StatusCode, header};

use super::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // Client side.
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    BadPath(#[from] super::route::PathError),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("reading the request body: {0}")]
    BodyRead(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{}", crate::ratelimit::headers::refusal(.report).1)]
    RateLimited {
        report: crate::ratelimit::RuleReport,
        legacy_headers: bool,
    },

    // Upstream side.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("upstream {addr}: {reason}")]
    UpstreamUnreachable { addr: String, reason: String },
    #[error("upstream {addr} did not answer within {after:?}")]
    UpstreamTimeout {
        addr: String,
        after: std::time::Duration,
    },
    #[error("upstream {addr}: {reason}")]
    UpstreamBroken { addr: String, reason: String },

    // Cache.
    #[error("no stored response satisfies only-if-cached")]
    NotCached,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadPath(_) | ProxyError::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoHealthyUpstream => StatusCode::SERVICE_UNAVAILABLE,
            // Pingora #980: a timeout is a 504, never a 502.
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // RFC 9111 §5.2.1.7.
            ProxyError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamBroken { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The `kind` label of `gatehouse_http_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadPath(_) => "bad_request",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::BodyRead(_) => "body_read",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::NoHealthyUpstream => "no_healthy_upstream",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamBroken { .. } => "upstream_broken",
            ProxyError::NotCached => "not_cached",
        }
    }

    /// A malformed or oversized request closes the connection: the rest of
    /// the stream cannot be trusted. A refusal on policy (401, 429) does not.
    pub fn closes_connection(&self) -> bool {
        self.status().is_client_error()
            && !matches!(
                self,
                ProxyError::Unauthorized(_) | ProxyError::RateLimited { .. }
            )
    }

    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let status = self.status();
        // Upstream details (addresses, OS errors) stay in the log, not the body.
        let detail = match &self {
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamBroken { .. } => {
                "the application server could not be reached".to_string()
            }
            ProxyError::UpstreamTimeout { .. } => {
                "the application server did not answer in time".to_string()
            }
            other => other.to_string(),
        };
        let close = self.closes_connection();
        let mut response = problem(status, &detail, request_id, close);
        let headers = response.headers_mut();
        match &self {
            ProxyError::RateLimited {
                report,
                legacy_headers,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(report.reset_secs));
                crate::ratelimit::headers::apply(headers, report, *legacy_headers);
            }
            ProxyError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// An `application/problem+json` response carrying the request id.
pub fn problem(
    status: StatusCode,
    detail: &str,
    request_id: &HeaderValue,
    close: bool,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "request_id": request_id.to_str().unwrap_or_default(),
    });
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert("x-request-id", request_id.clone());
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
