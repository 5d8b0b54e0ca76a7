//! HTTP/1.1 from clients, served by the gateway itself: one task per
//! connection reads a head, runs the request path, and writes the answer.
//!
//! The connection's own task reads and writes, as on the Gunicorn side
//! (`upstream::h1`): one read for a head that arrives whole, one vectored
//! write for a small answer, the head deadline kept by one timer per
//! connection that is moved, not set anew, for every request. The framing
//! rules are those of RFC 9112 §6: a head with both `Content-Length` and
//! `Transfer-Encoding` is answered 400 by the request path and the
//! connection closes (§6.1: the next hop could frame it differently),
//! conflicting lengths, a `Transfer-Encoding` whose last coding is not
//! `chunked`, obs-fold and malformed heads get 400 here, a head larger than
//! `max_header_size` or with more than `max_headers` fields 431, a version
//! other than 1.0 and 1.1 505.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::super::Shared;
use super::super::headers::line;
use super::super::log::LoggedBody;
use super::super::request::Exchange;
use super::super::upstream::h1::{Chunk, Decoder, Link, content_length, poll_body};
use super::deadline::Watched;
use crate::net::ZeroCopy;

/// The client's socket as the connection reads and writes it.
pub type Io = Watched<ZeroCopy>;

/// Read this much at a time.
const READ_SIZE: usize = 8 * 1024;
/// Header fields parsed into a table on the stack; a larger `max_headers`
/// takes one from the heap.
const STACK_FIELDS: usize = 128;
/// After an answer the request body of which was not read, what the client
/// still sends is read and dropped for this long, at most `LINGER_BYTES`,
/// so that closing does not reset the connection before the client has
/// read the answer (nginx's `lingering_close`).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_headers: usize,
    pub header_timeout: Duration,
    /// While the worker drains, how long a connection that has not sent a
    /// whole request yet may still send one.
    pub first_request_grace: Duration,
}

/// The client a connection serves, and the worker serving it.
pub struct Client {
    pub shared: Arc<Shared>,
    pub worker: usize,
    pub peer: SocketAddr,
}

/// A socket and what was read from it and not yet used.
struct Conn {
    io: Io,
    buf: BytesMut,
}

impl Conn {
    /// Read what the client sent; `Ok(0)` when it closed its side.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_read_into(&mut self.io, &mut self.buf, cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Write all of `slices`, in as few writes as the socket allows.
    async fn write_all(&mut self, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
        let mut slices = slices;
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let n = self.io.write_vectored(slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }
}

/// Read what the client sent into `buf`, growing it when it is nearly full.
fn poll_read_into(
    io: &mut Io,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Why a head is refused before the request path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400, with what was wrong.
    Malformed(&'static str),
    /// 431: larger than `max_header_size`, or more than `max_headers` fields.
    TooLarge,
    /// 505: not HTTP/1.0 or HTTP/1.1.
    Version,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }
}

/// A request head and what the connection must know about it.
#[derive(Debug)]
pub struct Head {
    pub parts: http::request::Parts,
    pub body: Decoder,
    /// The client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before its body.
    pub expect_continue: bool,
    /// Both `Content-Length` and `Transfer-Encoding`: answered 400, and the
    /// connection closes.
    pub ambiguous: bool,
}

/// Parse a request head from the front of `buf`, taking its bytes; `None`
/// while it is incomplete.
pub fn parse_head(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Head>, Refusal> {
    let uninit = const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
    let raw = if limits.max_headers <= STACK_FIELDS {
        // Left uninitialised: filling the table costs more than parsing a
        // small head.
        let mut fields = [uninit; STACK_FIELDS];
        scan(buf, limits, &mut fields[..limits.max_headers])?
    } else {
        let mut fields = vec![uninit; limits.max_headers];
        scan(buf, limits, &mut fields)?
    };
    let Some(raw) = raw else {
        return Ok(None);
    };
    let bytes = buf.split_to(raw.len).freeze();
    let uri = Uri::from_maybe_shared(bytes.slice(raw.target.0..raw.target.1))
        .map_err(|_| Refusal::Malformed("request target"))?;
    let mut headers = HeaderMap::with_capacity(raw.fields.len());
    for (name, start, end) in raw.fields {
        let value = HeaderValue::from_maybe_shared(bytes.slice(start..end))
            .map_err(|_| Refusal::Malformed("header value"))?;
        headers.append(name, value);
    }
    let (link, version) = (raw.link, raw.version);
    let ambiguous = link.length && link.transfer_encoding;
    let body = if ambiguous {
        Decoder::Done
    } else if link.transfer_encoding {
        // RFC 9112 §6.1: chunked must be the final coding of a request;
        // HTTP/1.0 has no transfer codings at all.
        if version == Version::HTTP_10 {
            return Err(Refusal::Malformed("Transfer-Encoding in HTTP/1.0"));
        }
        if !link.chunked_last {
            return Err(Refusal::Malformed(
                "Transfer-Encoding not ending in chunked",
            ));
        }
        Decoder::Chunked(Chunk::Size)
    } else if link.length {
        Decoder::Length(content_length(&headers).map_err(|_| Refusal::Malformed("Content-Length"))?)
    } else {
        Decoder::Done
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = raw.method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        keep_alive: link.persistent(version) && !ambiguous,
        expect_continue: raw.expect_continue && version == Version::HTTP_11 && !body.is_done(),
        ambiguous,
        body,
        parts,
    }))
}

/// Whether the request line is method, target and a well-formed `HTTP/x.y`: a version
/// this server does not speak (505), not a malformed line (400).
fn names_a_version(buf: &[u8]) -> bool {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.len() > 9
        && line.iter().filter(|b| **b == b' ').count() == 2
        && matches!(&line[line.len() - 9..], [b' ', b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// A head as `httparse` found it: where its parts lie in the buffer.
struct RawHead {
    len: usize,
    method: Method,
    version: Version,
    target: (usize, usize),
    fields: Vec<(HeaderName, usize, usize)>,
    link: Link,
    expect_continue: bool,
}

fn scan<'b>(
    buf: &'b [u8],
    limits: &Limits,
    fields: &mut [std::mem::MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<RawHead>, Refusal> {
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len > limits.max_head => {
            return Err(Refusal::TooLarge);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Err(Refusal::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) if names_a_version(buf) => return Err(Refusal::Version),
        Err(_) => return Err(Refusal::Malformed("malformed request head")),
    };
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(Refusal::Malformed("malformed request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Malformed("method"))?;
    // The target and values are sliced from the head's own bytes, not
    // copied: their places are noted while `httparse` holds the buffer.
    let base = buf.as_ptr().addr();
    let offset = |s: &[u8]| s.as_ptr().addr().wrapping_sub(base);
    let target_at = offset(target.as_bytes());
    let mut raw = RawHead {
        len,
        method,
        version: if minor == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        },
        target: (target_at, target_at + target.len()),
        fields: Vec::with_capacity(request.headers.len()),
        link: Link::default(),
        expect_continue: false,
    };
    for field in request.headers.iter() {
        let name = field_name(field.name).map_err(|_| Refusal::Malformed("header name"))?;
        raw.link.keeps(&name, field.value);
        if name == header::EXPECT {
            raw.expect_continue = field
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        }
        let start = if field.value.is_empty() {
            0
        } else {
            offset(field.value)
        };
        raw.fields.push((name, start, start + field.value.len()));
    }
    Ok(Some(raw))
}

/// A field name of a request head. The names browsers, curl and load
/// generators send are matched as they write them, which skips lowering
/// each byte before the lookup `HeaderName::from_bytes` makes; any other
/// name, in any case, goes through it.
fn field_name(name: &str) -> Result<HeaderName, header::InvalidHeaderName> {
    Ok(match name {
        "Host" | "host" => header::HOST,
        "User-Agent" | "user-agent" => header::USER_AGENT,
        "Accept" | "accept" => header::ACCEPT,
        "Accept-Encoding" | "accept-encoding" => header::ACCEPT_ENCODING,
        "Accept-Language" | "accept-language" => header::ACCEPT_LANGUAGE,
        "Connection" | "connection" => header::CONNECTION,
        "Cookie" | "cookie" => header::COOKIE,
        "Authorization" | "authorization" => header::AUTHORIZATION,
        "Content-Type" | "content-type" => header::CONTENT_TYPE,
        "Content-Length" | "content-length" => header::CONTENT_LENGTH,
        "Transfer-Encoding" | "transfer-encoding" => header::TRANSFER_ENCODING,
        "Referer" | "referer" => header::REFERER,
        "Origin" | "origin" => header::ORIGIN,
        "Cache-Control" | "cache-control" => header::CACHE_CONTROL,
        _ => return HeaderName::from_bytes(name.as_bytes()),
    })
}

/// A request body, read from the connection by the request path as it
/// needs it. The connection lends its socket for as long as the request
/// runs and takes it back afterwards.
pub enum RequestBody {
    Empty,
    Reading(Arc<Mutex<Option<Lent>>>),
}

/// The socket lent to a body, and where in the body the reading is.
pub struct Lent {
    conn: Conn,
    decoder: Decoder,
    /// Bytes of `100 Continue` still to write before the body is read.
    continue_left: usize,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let RequestBody::Reading(lent) = self.get_mut() else {
            return Poll::Ready(None);
        };
        let mut guard = lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(lent) = guard.as_mut() else {
            return Poll::Ready(Some(Err(io::ErrorKind::NotConnected.into())));
        };
        // The client waits for the go-ahead before it sends the body.
        while lent.continue_left > 0 {
            let at = CONTINUE.len() - lent.continue_left;
            match ready!(Pin::new(&mut lent.conn.io).poll_write(cx, &CONTINUE[at..])) {
                Ok(0) => return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into()))),
                Ok(n) => lent.continue_left -= n,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
        // A request body is never close-delimited: the end of the stream cuts it.
        let Conn { io, buf } = &mut lent.conn;
        poll_body(&mut lent.decoder, buf, cx, |buf, cx| {
            poll_read_into(io, buf, cx)
        })
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Reading(lent) => lent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .is_none_or(|l| l.decoder.is_done()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let RequestBody::Reading(lent) = self else {
            return SizeHint::with_exact(0);
        };
        let lent = lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match lent.as_ref().map(|l| l.decoder) {
            Some(Decoder::Length(n)) => SizeHint::with_exact(n),
            Some(Decoder::Done) | None => SizeHint::with_exact(0),
            Some(_) => SizeHint::default(),
        }
    }
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body bytes: HEAD, 1xx, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes: HTTP/1.0 and no length known.
    Close,
}

/// Serve one HTTP/1.x connection until it closes, times out, or the worker
/// drains (`draining` turns true).
pub async fn serve(
    io: Io,
    context: Client,
    limits: Limits,
    mut draining: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut conn = Conn {
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
    };
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let mut served = 0u64;
    let mut scratch = Vec::with_capacity(512);
    loop {
        let head = match read_head(&mut conn, &mut timer, &limits, &mut draining, served).await {
            Waited::Head(head) => head,
            Waited::Closed => return Ok(()),
            Waited::TimedOut => {
                context
                    .shared
                    .metrics
                    .connections_closed
                    .with_label_values(&["header_timeout"])
                    .inc();
                return Ok(());
            }
            Waited::Refused(refusal) => {
                refuse(&mut conn, refusal).await;
                return Ok(());
            }
        };
        served += 1;
        let Head {
            parts,
            body: decoder,
            keep_alive,
            expect_continue,
            ambiguous,
        } = head;
        let is_head = parts.method == Method::HEAD;
        let mut keep_alive = keep_alive && parts.method != Method::CONNECT;
        let version = parts.version;
        let exchange = Exchange::new(
            Arc::clone(&context.shared),
            context.worker,
            context.peer,
            ambiguous,
        );
        let response = if decoder.is_done() {
            let mut handled =
                std::pin::pin!(exchange.handle(Request::from_parts(parts, RequestBody::Empty)));
            // While the request runs, a client that leaves is noticed
            // (dropping the request logs it as 499); what it pipelines is kept.
            loop {
                tokio::select! {
                    biased;
                    response = &mut handled => {
                        let Ok(response) = response;
                        break response;
                    }
                    gone = watch_client(&mut conn, &limits) => if gone {
                        return Ok(());
                    },
                }
            }
        } else {
            let lent = Arc::new(Mutex::new(Some(Lent {
                conn,
                decoder,
                continue_left: if expect_continue { CONTINUE.len() } else { 0 },
            })));
            let request = Request::from_parts(parts, RequestBody::Reading(Arc::clone(&lent)));
            let Ok(response) = exchange.handle(request).await;
            let back = lent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let Some(back) = back else {
                return Ok(());
            };
            conn = back.conn;
            // A body not read to its end leaves the connection at an
            // unknown place in the client's bytes: answer, then close.
            if !back.decoder.is_done() {
                let answered =
                    respond(&mut conn, response, is_head, version, false, &mut scratch).await;
                if answered.is_ok() {
                    linger(&mut conn).await;
                }
                return Ok(());
            }
            response
        };
        keep_alive &= !*draining.borrow();
        let reusable = respond(
            &mut conn,
            response,
            is_head,
            version,
            keep_alive,
            &mut scratch,
        )
        .await?;
        if !reusable {
            // The body of an ambiguous request was never read: what the
            // client still sends must not reset the answer.
            if ambiguous {
                linger(&mut conn).await;
            } else {
                let _ = conn.io.shutdown().await;
            }
            return Ok(());
        }
    }
}

/// What waiting for a head gave.
// The head is returned once per request and taken apart at once; boxing it
// would cost an allocation per request.
#[expect(clippy::large_enum_variant)]
enum Waited {
    Head(Head),
    /// The client closed, or the worker drains and the connection is idle.
    Closed,
    TimedOut,
    Refused(Refusal),
}

/// Wait for the next head within the head deadline, which runs from the
/// moment the connection is ready for it, idle or not.
async fn read_head(
    conn: &mut Conn,
    timer: &mut Option<Pin<Box<Sleep>>>,
    limits: &Limits,
    draining: &mut watch::Receiver<bool>,
    served: u64,
) -> Waited {
    let mut deadline = Instant::now() + limits.header_timeout;
    let mut drain_seen = false;
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, limits) {
                Ok(Some(head)) => return Waited::Head(head),
                Ok(None) => {}
                Err(refusal) => return Waited::Refused(refusal),
            }
        }
        // One timer per connection, moved to each new deadline: moving a
        // timer that is still set to a later time is one atomic update.
        let sleep = match timer {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        tokio::select! {
            biased;
            read = conn.fill() => match read {
                Ok(0) | Err(_) => return Waited::Closed,
                Ok(_) => {}
            },
            () = sleep.as_mut() => return Waited::TimedOut,
            _ = draining.wait_for(|d| *d), if !drain_seen => {
                drain_seen = true;
                // Idle between requests: closed now. Fresh, or inside a
                // head: it may still send its request for a moment, which
                // is answered with `Connection: close`.
                if served > 0 && conn.buf.is_empty() {
                    return Waited::Closed;
                }
                deadline = deadline.min(Instant::now() + limits.first_request_grace);
            }
        }
    }
}

/// Wait for the client while its request runs: `true` once it has gone
/// (closed, even half-closed, or failed); bytes it pipelines are kept, up
/// to one head's worth, after which it is no longer read until its turn.
async fn watch_client(conn: &mut Conn, limits: &Limits) -> bool {
    if conn.buf.len() >= limits.max_head {
        return std::future::pending().await;
    }
    !matches!(conn.fill().await, Ok(n) if n > 0)
}

/// Answer a head the request path never saw, and close.
async fn refuse(conn: &mut Conn, refusal: Refusal) {
    let status = refusal.status();
    let mut out = Vec::with_capacity(128);
    status_line(&mut out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    date_line(&mut out);
    out.extend_from_slice(b"\r\n");
    if let Refusal::Malformed(why) = refusal {
        tracing::debug!(why, "refused a malformed request head");
    }
    if conn.io.write_all(&out).await.is_ok() {
        linger(conn).await;
    }
}

/// Close after reading and dropping what the client still sends, so that
/// its unread bytes do not reset the connection before it reads the answer.
async fn linger(conn: &mut Conn) {
    let _ = conn.io.shutdown().await;
    let drained = async {
        let mut total = 0;
        loop {
            conn.buf.clear();
            match conn.fill().await {
                Ok(n) if n > 0 && total < LINGER_BYTES => total += n,
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// Write an answer: its head, then its body framed as `Framing` says.
/// `Ok(true)`: the connection can carry another request.
async fn respond(
    conn: &mut Conn,
    response: Response<LoggedBody>,
    is_head: bool,
    version: Version,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let mut body = std::pin::pin!(body);
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut framing = if no_body {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if let Some(n) = parts
        .headers
        .contains_key(header::CONTENT_LENGTH)
        .then(|| content_length(&parts.headers).ok())
        .flatten()
    {
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    let keep_alive = keep_alive && framing != Framing::Close;

    out.clear();
    status_line(out, status);
    let own_length = !no_body;
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || (own_length && *name == header::CONTENT_LENGTH)
            || (status == StatusCode::NO_CONTENT && *name == header::CONTENT_LENGTH)
        {
            continue;
        }
        line(out, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        date_line(out);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if framing == Framing::None {
        // Not polled: the body is dropped, and its access-log line written.
        conn.write_all(&mut [IoSlice::new(out)]).await?;
        return Ok(keep_alive);
    }
    let mut head_sent = false;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        let frame = match body.as_mut().frame().await {
            None => break,
            Some(Err(e)) => {
                // Cut: the client sees a short body and a closed connection.
                tracing::debug!(error = %e, "response body failed while sent");
                return Err(e);
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let end = body.is_end_stream();
        let head: &[u8] = if head_sent { &[] } else { out };
        match framing {
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > left {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "response body longer than its length",
                    ));
                }
                left -= n;
                conn.write_all(&mut [IoSlice::new(head), IoSlice::new(&data)])
                    .await?;
            }
            Framing::Chunked => {
                let tail: &[u8] = if end { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                let size_line = format!("{:x}\r\n", data.len());
                conn.write_all(&mut [
                    IoSlice::new(head),
                    IoSlice::new(size_line.as_bytes()),
                    IoSlice::new(&data),
                    IoSlice::new(tail),
                ])
                .await?;
                if end {
                    // Terminated with the last chunk: nothing more to write.
                    framing = Framing::None;
                }
            }
            Framing::Close | Framing::None => {
                conn.write_all(&mut [IoSlice::new(head), IoSlice::new(&data)])
                    .await?;
            }
        }
        head_sent = true;
        if end {
            break;
        }
    }
    let head: &[u8] = if head_sent { &[] } else { out };
    match framing {
        Framing::Length(_) if left > 0 => {
            conn.write_all(&mut [IoSlice::new(head)]).await?;
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "response body shorter than its length",
            ))
        }
        Framing::Chunked => {
            conn.write_all(&mut [IoSlice::new(head), IoSlice::new(b"0\r\n\r\n")])
                .await?;
            Ok(keep_alive)
        }
        _ => {
            conn.write_all(&mut [IoSlice::new(head)]).await?;
            Ok(keep_alive)
        }
    }
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: …`, formatted once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        line(out, "date", date.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_headers: 16,
        header_timeout: Duration::from_secs(1),
        first_request_grace: Duration::from_secs(1),
    };

    fn parse(text: &[u8]) -> Result<Option<Head>, Refusal> {
        parse_head(&mut BytesMut::from(text), &LIMITS)
    }

    fn head(text: &[u8]) -> Head {
        parse(text).unwrap().expect("a whole head")
    }

    #[test]
    fn a_head_names_method_target_version_and_fields() {
        let mut buf = BytesMut::from(
            &b"GET /v1/search/?q=a HTTP/1.1\r\nHost: x\r\nX-Two: a\r\nx-two: b\r\n\r\nGET /next"[..],
        );
        let head = parse_head(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(head.parts.method, Method::GET);
        assert_eq!(head.parts.uri, "/v1/search/?q=a");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["host"], "x");
        let twos: Vec<_> = head.parts.headers.get_all("x-two").iter().collect();
        assert_eq!(twos, ["a", "b"]);
        assert_eq!(head.body, Decoder::Done);
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"GET /next", "only the head's bytes are taken");
        // A method in another case is another method: routes match it
        // case-insensitively, upstream sees it as sent.
        assert_eq!(head_of("post").parts.method.as_str(), "post");
    }

    fn head_of(method: &str) -> Head {
        head(format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let length = head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(length.body, Decoder::Length(5));
        let listed = head(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(listed.body, Decoder::Length(5));
        let chunked = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(chunked.body, Decoder::Chunked(Chunk::Size));

        // Both: the request path answers 400, and the connection closes.
        for both in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n",
        ] {
            let head = head(both);
            assert!(head.ambiguous);
            assert!(!head.keep_alive);
            assert_eq!(head.body, Decoder::Done, "its body is never read");
        }
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
            b"GET\x01 / HTTP/1.1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
        ] {
            let parsed = parse(bad).map(|h| h.map(|h| shape(&h)));
            assert!(
                matches!(parsed, Err(Refusal::Malformed(_))),
                "{:?}: {parsed:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            Refusal::Version
        );
        assert_eq!(
            parse(b"GET / HTTP/1.2\r\n\r\n").unwrap_err(),
            Refusal::Version
        );
    }

    #[test]
    fn persistence_and_expectations() {
        assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let expecting = b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
        assert!(head(expecting).expect_continue);
        // Nothing to wait for: no body, or an HTTP/1.0 client.
        assert!(!head(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        let old = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert!(!head(old).expect_continue);
    }

    #[test]
    fn heads_past_the_limits_get_431() {
        let many: String = (0..17).map(|i| format!("X-{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(text.as_bytes()).unwrap_err(), Refusal::TooLarge);
        let long = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "v".repeat(8192));
        assert_eq!(parse(long.as_bytes()).unwrap_err(), Refusal::TooLarge);
        // Not whole yet, and already too large: refused before the rest.
        let partial = format!("GET / HTTP/1.1\r\nX-Big: {}", "v".repeat(8192));
        assert_eq!(parse(partial.as_bytes()).unwrap_err(), Refusal::TooLarge);
        let fits = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "v".repeat(8000));
        assert!(parse(fits.as_bytes()).unwrap().is_some());
        // A table larger than the one on the stack.
        let wide = Limits {
            max_headers: 300,
            ..LIMITS
        };
        let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let parsed = parse_head(&mut BytesMut::from(text.as_bytes()), &wide);
        assert_eq!(parsed.unwrap().unwrap().parts.headers.len(), 200);
    }

    fn shape(head: &Head) -> String {
        format!(
            "{} {} {:?} {:?} {:?} {} {} {}",
            head.parts.method,
            head.parts.uri,
            head.parts.version,
            head.parts.headers,
            head.body,
            head.keep_alive,
            head.expect_continue,
            head.ambiguous
        )
    }

    proptest! {
        /// Whatever the client sends: a head, a refusal, or a wait for more;
        /// never a panic.
        #[test]
        fn any_bytes_are_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        /// A head parses the same however the reads cut it: incomplete until
        /// its last byte, then the same head.
        #[test]
        fn a_head_parses_the_same_however_it_arrives(
            target in "/[a-z0-9/%?=&.-]{0,40}",
            fields in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,30}"), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut text = format!("GET {target} HTTP/1.1\r\nHost: x\r\n");
            for (name, value) in &fields {
                text.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            text.push_str("\r\n");
            let whole = parse(text.as_bytes());
            let at = cut.index(text.len());
            let mut buf = BytesMut::from(&text.as_bytes()[..at]);
            prop_assert!(matches!(parse_head(&mut buf, &LIMITS), Ok(None)));
            buf.extend_from_slice(&text.as_bytes()[at..]);
            let later = parse_head(&mut buf, &LIMITS);
            match (whole, later) {
                (Ok(Some(a)), Ok(Some(b))) => prop_assert_eq!(shape(&a), shape(&b)),
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a.map(|h| h.map(|h| shape(&h))), b.map(|h| h.map(|h| shape(&h)))),
            }
        }
    }
}
