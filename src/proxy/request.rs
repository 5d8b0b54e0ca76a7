//! The request path, one request top to bottom. [`Exchange::handle`] calls
//! the phases in the order `docs/architecture.md` draws them:
//!
//! ```text
//! accept → identify → route → limit → cache → upstream → response → log
//! ```
//!
//! The `cache` phase is [`super::cache`]: it may answer before `upstream`,
//! and it sees the response before `response`.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use super::body::ProxyBody;
use super::cache;
use super::error::ProxyError;
use super::headers::{combine_cookies, forwarded_fields, line, strip_hop_by_hop};
use super::identify::{Caller, Peer, X_REQUEST_ID};
use super::log::{AccessRecord, LoggedBody};
use super::route::wsgi_path;
use super::upstream::Outgoing;
use super::{Live, Shared};

/// A request body as the request path reads it: hyper's for HTTP/2, the
/// gateway's own for HTTP/1 (`accept::http1`).
pub trait ClientBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> ClientBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

/// One request's journey and what the `log` phase reports about it.
pub struct Exchange {
    shared: Arc<Shared>,
    /// The configuration this request sees from start to end, even across a reload.
    live: Arc<Live>,
    worker: usize,
    peer: SocketAddr,
    ambiguous_framing: bool,
    started: Instant,
    /// What the `log` phase and an error response need of the caller, kept
    /// once `identify` has run (not the whole `Caller`: its subject would
    /// be copied for every request).
    request_id: Option<HeaderValue>,
    client: Option<IpAddr>,
    /// Taken by the `log` phase; still here when the exchange is dropped
    /// before it, which means the client went away.
    request: Option<RequestLine>,
    /// The matched route's index in `live.routes`; `None`: no route matched.
    route: Option<usize>,
    upstream: Option<Arc<str>>,
    upstream_time: Option<Duration>,
    request_bytes: u64,
    /// The rate-limit rule reported on an allowed response.
    limit_report: Option<crate::ratelimit::RuleReport>,
}

impl Exchange {
    pub fn new(
        shared: Arc<Shared>,
        worker: usize,
        peer: SocketAddr,
        ambiguous_framing: bool,
    ) -> Self {
        let live = shared.live.load_full();
        Exchange {
            shared,
            live,
            worker,
            peer,
            ambiguous_framing,
            started: Instant::now(),
            request_id: None,
            client: None,
            request: None,
            route: None,
            upstream: None,
            upstream_time: None,
            request_bytes: 0,
            limit_report: None,
        }
    }

    /// Run the phases, turn an error into its problem response, and hand
    /// the response to the `log` phase, which writes its line once the body
    /// is out. Dropped before that (the client went away), the exchange logs
    /// a 499 itself. It never fails: the `Result` is the one hyper's HTTP/2
    /// service wants.
    pub async fn handle<B: ClientBody>(
        mut self,
        req: Request<B>,
    ) -> Result<Response<LoggedBody>, std::convert::Infallible> {
        self.request = Some(RequestLine {
            method: req.method().clone(),
            // A clone shares the request's bytes; the text is read only if
            // a line is written.
            target: req.uri().clone(),
            version: req.version(),
        });
        let response = match self.run(req).await {
            Ok(response) => response,
            Err(error) => {
                self.shared
                    .metrics
                    .errors
                    .with_label_values(&[error.kind()])
                    .inc();
                if error.status().is_server_error() {
                    tracing::warn!(error = %error, "request failed");
                }
                error.into_response(self.request_id())
            }
        };
        let (parts, body) = response.into_parts();
        let record = self.log(parts.status);
        Ok(Response::from_parts(parts, LoggedBody::new(body, record)))
    }

    async fn run<B: ClientBody>(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.accept(&req)?;
        let caller = self.identify(&req).await?;
        if req.uri().path() == self.live.config.server.health_path {
            return Ok(self.health(&caller));
        }
        let path = self.route(&req)?;
        self.limit(&caller).await?;

        // cache: a write names what it invalidates; a read may be answered.
        let live = Arc::clone(&self.live);
        let config = &live.config;
        let mut plan = None;
        let mut bypass = None;
        let mut write = None;
        if config.cache.enabled {
            let route = self.route.and_then(|i| live.routes.get(i));
            write = cache::WriteTarget::new(
                config,
                route,
                req.method(),
                req.uri(),
                req.headers(),
                &path,
            );
            if write.is_none() {
                let ask = cache::Ask {
                    config,
                    route,
                    route_metrics: live.routes.metrics(self.route),
                    method: req.method(),
                    uri: req.uri(),
                    headers: req.headers(),
                    path: &path,
                    caller: &caller,
                };
                // A hit from L1 never waits. Else bound first: a temporary
                // of the `match` line would live to the end of the match,
                // across the awaits in its arms, and the unboxed lookup
                // future would take room in this one.
                let lookup = match cache::lookup_local(&self.shared.cache, &ask) {
                    Ok(lookup) => lookup,
                    Err(keyed) => Box::pin(cache::lookup(&self.shared.cache, ask, keyed)).await?,
                };
                match lookup {
                    cache::Lookup::Bypass(reason) => bypass = reason,
                    // Kept boxed: it lives across the upstream call, in
                    // this request's future.
                    cache::Lookup::Fetch(p) => plan = Some(p),
                    cache::Lookup::Answer(response, refresh) => {
                        if let Some(refresh) = refresh {
                            let request = self.prepare(req, &caller).await?;
                            tokio::spawn(cache::refresh(
                                Arc::clone(&self.shared),
                                Arc::clone(&live),
                                self.worker,
                                request,
                                refresh,
                            ));
                        }
                        return Ok(self.response(response, &caller));
                    }
                }
            }
        }

        let mut request = self.prepare(req, &caller).await?;
        if let Some(plan) = &mut plan {
            cache::add_validators(plan, request.headers_mut());
        }
        let result = self.send(request).await;
        let mut response = match plan {
            Some(plan) => cache::complete(&self.shared.cache, &config.cache, *plan, result)?,
            None => result?,
        };
        if let Some(reason) = bypass {
            cache::bypass_status(response.headers_mut(), reason);
        }
        let status = response.status();
        if let Some(write) = write {
            Box::pin(write.invalidate(
                &self.shared.cache,
                &config.cache,
                status,
                response.headers_mut(),
            ))
            .await;
        }
        Ok(self.response(response, &caller))
    }

    /// accept: refuse framing a next hop could read differently (RFC 9112 §6.1).
    /// The connection itself answers obs-fold and conflicting `Content-Length` with 400
    /// and oversized heads with 431.
    fn accept<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if self.ambiguous_framing {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if req.uri().path_and_query().is_none() && req.method() != Method::OPTIONS {
            return Err(ProxyError::BadRequest("request target has no path"));
        }
        // The target's host replaces `Host`; one with credentials in it
        // (`http://user:secret@host/`) is an error (RFC 9110 §4.2.4, RFC 9113
        // §8.3.1), not a host to forward or key the cache on.
        if req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().contains('@'))
        {
            return Err(ProxyError::BadRequest("userinfo in the request target"));
        }
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1; HTTP/2 may use :authority.
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if hosts > 1 {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        if hosts == 0 && req.version() == Version::HTTP_11 {
            return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
        }
        Ok(())
    }

    /// identify: who is calling, the client address and the request id. A
    /// bad token is a 401 only when `identity.jwt.reject_invalid` says so.
    async fn identify<B>(&mut self, req: &Request<B>) -> Result<Caller, ProxyError> {
        let server = &self.live.config.server;
        let peer = Peer {
            addr: self.peer.ip(),
            trusted: &server.trusted_proxies,
            real_ip_header: server.real_ip_header,
        };
        let (caller, invalid) = self.live.identifier.identify(req.headers(), peer).await;
        self.request_id = Some(caller.request_id.clone());
        self.client = Some(caller.client);
        match invalid {
            Some(invalid) => Err(ProxyError::Unauthorized(invalid.to_string())),
            None => Ok(caller),
        }
    }

    /// limit: check and count every rule that applies; 429 when one refuses.
    async fn limit(&mut self, caller: &Caller) -> Result<(), ProxyError> {
        let limiter = &self.live.limiter;
        let subject = crate::ratelimit::Subject {
            id: &caller.subject,
            client: caller.client,
            tier: caller.tier.as_deref(),
            admin: caller.admin,
            within: caller.within.as_deref(),
        };
        let rules = self
            .route
            .and_then(|i| self.live.routes.get(i))
            .map_or(&[][..], |r| r.limits.as_slice());
        let checks = limiter.checks(&subject, rules);
        if checks.is_empty() {
            // Exempt: nothing to count or report.
            return Ok(());
        }
        // Boxed: the Redis call's future is large, and every request's future
        // is as large as its largest part (it is copied once per request).
        let decision = Box::pin(limiter.decide(&checks, &self.shared.metrics)).await;
        let config = limiter.config();
        match decision.report {
            Some(report) if !decision.allowed => Err(ProxyError::RateLimited {
                report,
                legacy_headers: config.legacy_headers,
            }),
            report => {
                self.limit_report = report.filter(|_| config.headers);
                Ok(())
            }
        }
    }

    /// The gateway's own liveness answer on the main listener.
    fn health(&self, caller: &Caller) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::full("{\"status\":\"ok\"}"));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_REQUEST_ID, caller.request_id.clone());
        response
    }

    /// route: match the one route table on the path Django will see; a path
    /// that cannot be decoded unambiguously is a 400 and never reaches Django.
    /// The decoded path is what the cache keys and tags are made of.
    fn route<'r, B>(&mut self, req: &'r Request<B>) -> Result<Cow<'r, [u8]>, ProxyError> {
        let path = wsgi_path(req.uri().path()).map_err(ProxyError::BadPath)?;
        self.route = self.live.routes.find(req.method(), &path);
        Ok(path)
    }

    /// upstream, first half: buffer the body and rewrite the headers.
    async fn prepare<B: ClientBody>(
        &mut self,
        req: Request<B>,
        caller: &Caller,
    ) -> Result<Request<Outgoing>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // Boxed, and only when there is a body: its timer and buffers would
        // otherwise make every request's future larger.
        let body = if body.is_end_stream() {
            Bytes::new()
        } else {
            Box::pin(self.read_body(body)).await?
        };
        self.request_bytes = body.len() as u64;

        // An absolute-form target names the host, and a proxy replaces the
        // client's `Host` with it (RFC 9112 §3.2.2), as nginx's `$host` does;
        // an HTTP/2 request's `:authority` comes the same way.
        let authority = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let field = parts.headers.get(header::HOST);
        let in_fields = field.is_some() && (authority.is_none() || authority.as_ref() == field);
        let host = authority.or_else(|| field.cloned());
        let headers = &mut parts.headers;
        let stripped = strip_hop_by_hop(headers);
        combine_cookies(headers);
        let mut set = Vec::with_capacity(128);
        forwarded_fields(headers, caller, host.as_ref(), &mut set);
        // The client's `Host` stays where it is, unless its `Connection`
        // named it or the target named another host.
        // `preserve_host = false` is applied per attempt, with the address of
        // the server actually chosen.
        match host {
            Some(host) if stripped || !in_fields => {
                headers.insert(header::HOST, host);
            }
            Some(_) => {}
            None => {
                headers.remove(header::HOST);
            }
        }
        // The body is already here: Gunicorn must not wait to send 100
        // Continue, and its length is the gateway's to say. Most requests
        // carry neither field.
        if headers
            .keys()
            .any(|name| *name == header::EXPECT || *name == header::CONTENT_LENGTH)
        {
            headers.remove(header::EXPECT);
            headers.remove(header::CONTENT_LENGTH);
        }
        if !body.is_empty() || body_expected(&parts.method) {
            let length = HeaderValue::from(body.len());
            line(&mut set, header::CONTENT_LENGTH.as_str(), length.as_bytes());
        }
        // Gunicorn gets origin-form even when an HTTP/2 client sent a full URI.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = parts.uri.path_and_query().cloned();
            parts.uri = Uri::from_parts(origin).unwrap_or_else(|_| Uri::from_static("/"));
        }
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, Outgoing { set, body }))
    }

    /// upstream, second half: send to a healthy Gunicorn.
    async fn send(
        &mut self,
        request: Request<Outgoing>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upstreams = Arc::clone(&self.live.upstreams);
        // Boxed for the same reason as the limiter's call.
        let forwarded =
            Box::pin(upstreams.forward(self.worker, request, &self.shared.metrics)).await?;
        self.upstream = Some(Arc::clone(&forwarded.upstream.label));
        self.upstream_time = Some(forwarded.upstream_time);
        Ok(forwarded.response)
    }

    /// The whole request body, within `max_body_size` (else 413) and
    /// `body_read_timeout`, before any upstream is contacted: Gunicorn's sync
    /// workers must not wait on a slow client.
    async fn read_body<B: ClientBody>(&self, body: B) -> Result<Bytes, ProxyError> {
        let server = &self.live.config.server;
        let limit = server.max_body_size;
        if body.size_hint().lower() > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
        match tokio::time::timeout(server.body_read_timeout, limited.collect()).await {
            Err(_) => Err(ProxyError::BodyTimeout(server.body_read_timeout)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ProxyError::BodyTooLarge { limit })
            }
            Ok(Err(e)) => Err(ProxyError::BodyRead(e.to_string())),
        }
    }

    /// response: strip hop-by-hop and internal fields and tag the response
    /// with the request id.
    fn response(&self, mut response: Response<ProxyBody>, caller: &Caller) -> Response<ProxyBody> {
        let headers = response.headers_mut();
        strip_hop_by_hop(headers);
        headers.remove(&self.live.config.cache.tag_header);
        headers.insert(X_REQUEST_ID, caller.request_id.clone());
        if let Some(report) = &self.limit_report {
            let legacy = self.live.limiter.config().legacy_headers;
            crate::ratelimit::headers::apply(headers, report, legacy);
        }
        response
    }

    fn request_id(&self) -> &HeaderValue {
        static UNKNOWN: HeaderValue = HeaderValue::from_static("-");
        self.request_id.as_ref().unwrap_or(&UNKNOWN)
    }

    /// log: the request metrics now, and the record the access-log line is
    /// written from when the body is out. Called once.
    fn log(&mut self, status: StatusCode) -> Option<AccessRecord> {
        let request = self.request.take()?;
        let route = self.live.routes.metrics(self.route);
        route.requests(&request.method, status).inc();
        route.duration.observe(self.started.elapsed().as_secs_f64());
        self.shared
            .metrics
            .bytes_received
            .inc_by(self.request_bytes);
        let config = &self.live.config.log;
        Some(AccessRecord {
            shared: Arc::clone(&self.shared),
            format: config.access_log.then_some(config.format),
            request_id: self.request_id().clone(),
            client: self.client.unwrap_or(self.peer.ip()),
            method: request.method,
            target: request.target,
            version: request.version,
            status: status.as_u16(),
            route: self.live.routes.name(self.route),
            started: self.started,
            upstream: self.upstream.take(),
            upstream_time: self.upstream_time,
        })
    }
}

/// The client went away before its response: log it as nginx does, 499.
impl Drop for Exchange {
    fn drop(&mut self) {
        let status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
        if let Some(record) = self.log(status) {
            record.finish(0, false);
        }
    }
}

/// What the access log says of the request itself.
struct RequestLine {
    method: Method,
    target: Uri,
    version: Version,
}

/// Methods whose requests carry a body even when it is empty.
fn body_expected(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}
