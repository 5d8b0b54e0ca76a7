//! HTTP/1.1 to Gunicorn, driven by the task of the request it carries.
//!
//! The request's own task writes the head and body and reads the response:
//! no connection task beside it, no channel between the two, no waker handed
//! across for every message and every body chunk. On the small-response path
//! those hand-offs cost more than HTTP itself (`docs/benchmarks.md`).
//!
//! A response is framed as RFC 9112 §6.3 says; anything else is an error and
//! its connection is never reused. Its hop-by-hop fields are read for that
//! and for keep-alive as the head is parsed, and are not kept in it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::super::headers::{is_hop_by_hop, line};
use crate::net::Stream;

/// A response head larger than this is refused, as nginx refuses one larger
/// than `proxy_buffer_size` ("upstream sent too big header").
const MAX_HEAD: usize = 64 * 1024;
/// Header fields in one response head.
const MAX_HEADERS: usize = 128;
/// Read this much at a time.
const READ_SIZE: usize = 16 * 1024;
/// A request body this small goes out in the same write as its head.
const COALESCE: usize = 16 * 1024;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// All trailer fields of a chunked body, which are read and dropped.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection ended before any byte of a response.
    #[error("connection closed before a response")]
    ClosedEarly,
    #[error("connection closed in the middle of the message")]
    Truncated,
    #[error("no data within the response timeout")]
    TimedOut,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl H1Error {
    pub fn into_io(self) -> io::Error {
        match self {
            H1Error::Io(e) => e,
            H1Error::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, self.to_string()),
            H1Error::TimedOut => io::Error::new(io::ErrorKind::TimedOut, self.to_string()),
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// The longest wait between two reads (nginx's `proxy_read_timeout`). One
/// timer serves a whole response; it is pushed back only when it fires
/// after a read, not at every read.
pub struct ReadTimer {
    sleep: Pin<Box<Sleep>>,
    period: std::time::Duration,
    last_read: Instant,
}

impl ReadTimer {
    /// A timer due at `deadline`, `period` after the wait began. It reuses
    /// `sleep`, the timer a kept-alive connection carried from its last
    /// request, when there is one: moving a timer that is still set to a
    /// later time is one atomic update, where setting a new one and
    /// dropping it cost an insertion into the runtime's timer wheel and a
    /// removal from it, on every request.
    pub fn new(
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Instant,
        period: std::time::Duration,
    ) -> Self {
        let sleep = match sleep {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        ReadTimer {
            sleep,
            period,
            last_read: deadline - period,
        }
    }

    /// When the last read from the server ended (the attempt's start before
    /// any): the end of a buffered response, without reading the clock again.
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// The timer itself, to bound a wait that is not a read (a write).
    pub fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.sleep.as_mut()
    }

    /// The timer, for the connection to carry to its next request.
    pub fn into_sleep(self) -> Pin<Box<Sleep>> {
        self.sleep
    }

    /// The timer fired: push it back if a read came since, else time is up.
    fn extend(&mut self) -> bool {
        let due = self.last_read + self.period;
        if due > Instant::now() {
            self.sleep.as_mut().reset(due);
            true
        } else {
            false
        }
    }
}

/// One connection and what has been read from it and not yet used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    /// The response timer of its last request, kept for the next.
    timer: Option<Pin<Box<Sleep>>>,
}

/// A response head, and how its body is framed.
pub struct Head {
    pub parts: http::response::Parts,
    pub body: Decoder,
    /// The connection can carry another request once the body is read.
    pub keep_alive: bool,
}

impl Conn {
    pub fn new(io: Stream) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            timer: None,
        }
    }

    /// The timer this connection carried from its last request, if any.
    pub fn take_timer(&mut self) -> Option<Pin<Box<Sleep>>> {
        self.timer.take()
    }

    /// Keep a response's timer for this connection's next request.
    pub fn keep_timer(&mut self, timer: ReadTimer) {
        self.timer = Some(timer.into_sleep());
    }

    /// Nothing arrived while the connection sat idle: the server has not
    /// closed it and has sent nothing unasked.
    pub fn is_clean(&self) -> bool {
        self.buf.is_empty() && self.io.is_quiet()
    }

    /// Write a request: its head and, when small, its body in one write.
    pub async fn send(&mut self, mut head: Vec<u8>, body: &[u8]) -> io::Result<()> {
        if body.len() <= COALESCE {
            head.extend_from_slice(body);
            self.io.write_all(&head).await
        } else {
            self.io.write_all(&head).await?;
            self.io.write_all(body).await
        }
    }

    async fn fill(&mut self, timer: &mut ReadTimer) -> Result<usize, H1Error> {
        self.buf.reserve(READ_SIZE);
        loop {
            tokio::select! {
                biased;
                read = self.io.read_buf(&mut self.buf) => {
                    let n = read?;
                    timer.last_read = Instant::now();
                    return Ok(n);
                }
                () = timer.sleep.as_mut() => {
                    if !timer.extend() {
                        return Err(H1Error::TimedOut);
                    }
                }
            }
        }
    }

    /// Read the head of the response to a `method` request, skipping
    /// interim (1xx) responses.
    pub async fn read_head(
        &mut self,
        method: &Method,
        timer: &mut ReadTimer,
    ) -> Result<Head, H1Error> {
        let mut got_any = !self.buf.is_empty();
        loop {
            if let Some(head) = parse_head(&mut self.buf, method)? {
                if head.parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Invalid("101 to a request that asked no upgrade"));
                }
                if head.parts.status.is_informational() {
                    got_any = true;
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(H1Error::Invalid("response head too large"));
            }
            if self.fill(timer).await? == 0 {
                return Err(if got_any || !self.buf.is_empty() {
                    H1Error::Truncated
                } else {
                    H1Error::ClosedEarly
                });
            }
            got_any = true;
        }
    }

    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(
        &mut self,
        body: &mut Decoder,
        timer: &mut ReadTimer,
    ) -> Result<Option<Bytes>, H1Error> {
        loop {
            match body.decode(&mut self.buf)? {
                Step::Data(data) => return Ok(Some(data)),
                Step::End => return Ok(None),
                Step::More => {
                    if self.fill(timer).await? == 0 {
                        body.at_eof()?;
                    }
                }
            }
        }
    }
}

/// Parse a response head from the front of `buf`, taking its bytes;
/// `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, H1Error> {
    // Left uninitialised: filling 128 empty fields per response costs
    // more than parsing a small head.
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid("more than 128 header fields"));
        }
        Err(_) => return Err(H1Error::Invalid("malformed response head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(H1Error::Invalid("status code"))?;
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Values are sliced from the head's own bytes, not copied: their
    // places are noted while `httparse` holds the buffer. Hop-by-hop
    // fields are read for framing and persistence, and not kept: the
    // client's response never carries them (a `Connection` that names
    // other fields stays, for `strip_hop_by_hop` to act on).
    let base = buf.as_ptr().addr();
    let mut spans = Vec::with_capacity(response.headers.len());
    let mut link = Link::default();
    for field in response.headers.iter() {
        let name = field_name(field.name).map_err(|_| H1Error::Invalid("header name"))?;
        if !link.keeps(&name, field.value) {
            continue;
        }
        let start = match field.value.as_ptr().addr().checked_sub(base) {
            Some(start) if !field.value.is_empty() => start,
            _ => 0,
        };
        spans.push((name, start, start + field.value.len()));
    }
    let bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, start, end) in spans {
        let value = HeaderValue::from_maybe_shared(bytes.slice(start..end))
            .map_err(|_| H1Error::Invalid("header value"))?;
        headers.append(name, value);
    }
    let (body, framed) = framing(method, status, &link, &headers)?;
    let keep_alive = framed && link.persistent(version);
    let mut head = Response::new(());
    *head.status_mut() = status;
    *head.version_mut() = version;
    *head.headers_mut() = headers;
    let (parts, ()) = head.into_parts();
    Ok(Some(Head {
        parts,
        body,
        keep_alive,
    }))
}

/// A field name of a response head. The names Gunicorn, Django and nginx
/// send are matched as they write them, which skips lowering each byte
/// before the lookup `HeaderName::from_bytes` makes (about a hundred
/// instructions a field); any other name, in any case, goes through it.
fn field_name(name: &str) -> Result<HeaderName, header::InvalidHeaderName> {
    Ok(match name {
        "Server" => header::SERVER,
        "Date" => header::DATE,
        "Connection" => header::CONNECTION,
        "Content-Type" => header::CONTENT_TYPE,
        "Content-Length" => header::CONTENT_LENGTH,
        "Transfer-Encoding" => header::TRANSFER_ENCODING,
        "Vary" => header::VARY,
        "Cache-Control" => header::CACHE_CONTROL,
        "Expires" => header::EXPIRES,
        "Last-Modified" => header::LAST_MODIFIED,
        "ETag" => header::ETAG,
        "Set-Cookie" => header::SET_COOKIE,
        "Location" => header::LOCATION,
        "Accept-Ranges" => header::ACCEPT_RANGES,
        "Content-Encoding" => header::CONTENT_ENCODING,
        "Content-Language" => header::CONTENT_LANGUAGE,
        "X-Frame-Options" => header::X_FRAME_OPTIONS,
        "X-Content-Type-Options" => header::X_CONTENT_TYPE_OPTIONS,
        "Referrer-Policy" => header::REFERRER_POLICY,
        _ => return HeaderName::from_bytes(name.as_bytes()),
    })
}

/// How the body is framed (RFC 9112 §6.3), and whether that framing lets
/// the connection be reused afterwards.
fn framing(
    method: &Method,
    status: StatusCode,
    link: &Link,
    headers: &HeaderMap,
) -> Result<(Decoder, bool), H1Error> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Decoder::Done, true));
    }
    let has_length = link.length;
    if link.transfer_encoding {
        return Ok(if link.chunked_last {
            // With both, Transfer-Encoding wins and the connection closes
            // after the message (§6.3, item 3).
            (Decoder::Chunked(Chunk::Size), !has_length)
        } else {
            (Decoder::Close, false)
        });
    }
    if has_length {
        return Ok((Decoder::Length(content_length(headers)?), true));
    }
    Ok((Decoder::Close, false))
}

/// One `Content-Length`, or several fields or list members that all agree.
pub fn content_length(headers: &HeaderMap) -> Result<u64, H1Error> {
    let mut fields = headers.get_all(header::CONTENT_LENGTH).iter();
    // The usual case: one field of a few digits.
    if let (Some(only), None) = (fields.next(), fields.next()) {
        let digits = only.as_bytes();
        if (1..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) {
            return Ok(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')));
        }
    }
    let mut length = None;
    for member in headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
    {
        let digits = member.trim_ascii();
        let value = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
            .ok_or(H1Error::Invalid("Content-Length"))?;
        if length.is_some_and(|l| l != value) {
            return Err(H1Error::Invalid("conflicting Content-Length"));
        }
        length = Some(value);
    }
    length.ok_or(H1Error::Invalid("Content-Length"))
}

/// What a response head's `Content-Length`, `Transfer-Encoding` and
/// `Connection` fields say, read once as the head is parsed.
#[derive(Debug, Default)]
pub struct Link {
    /// A `Content-Length` field is present.
    pub length: bool,
    pub transfer_encoding: bool,
    /// The last coding `Transfer-Encoding` names is `chunked`.
    pub chunked_last: bool,
    close: bool,
    keep_alive: bool,
}

impl Link {
    /// Note one field of the head; `false`: it is not kept.
    pub fn keeps(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        self.length |= *name == header::CONTENT_LENGTH;
        !is_hop_by_hop(name) || self.note(name, value)
    }

    /// Note a hop-by-hop field; `true` when it must stay in the head: a
    /// `Connection` that names fields other than `close` and `keep-alive`.
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        let members = || {
            value
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|m| !m.is_empty())
        };
        if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in members() {
                self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            }
        } else if *name == header::CONNECTION {
            let mut names_fields = false;
            for token in members() {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else {
                    names_fields = true;
                }
            }
            return names_fields;
        }
        false
    }

    /// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only
    /// when told `keep-alive`.
    pub fn persistent(&self, version: Version) -> bool {
        if version == Version::HTTP_11 {
            !self.close
        } else {
            self.keep_alive
        }
    }
}

/// A request head in HTTP/1.1 form. `host`, when given, replaces the
/// request's own `Host`; `set` holds the lines the gateway wrote itself
/// (`headers::forwarded_fields`). Names and values come from `http` types,
/// which cannot hold CR or LF, so nothing here can split the message.
pub fn encode_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    set: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + target.len() + headers.len() * 48 + set.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        line(&mut out, header::HOST.as_str(), host.as_bytes());
    }
    for (name, value) in headers {
        if host.is_some() && name == header::HOST {
            continue;
        }
        line(&mut out, name.as_str(), value.as_bytes());
    }
    out.extend_from_slice(set);
    out.extend_from_slice(b"\r\n");
    out
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq)]
pub enum Step {
    Data(Bytes),
    /// More bytes must be read first.
    More,
    End,
}

/// A body being read, as its head framed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the server closes the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer bytes seen so far.
    Trailers(usize),
}

impl Decoder {
    /// Take the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match self {
                Decoder::Done | Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Step::End);
                }
                Decoder::Length(left) => return Ok(take(buf, left)),
                Decoder::Close if buf.is_empty() => return Ok(Step::More),
                Decoder::Close => return Ok(Step::Data(buf.split().freeze())),
                Decoder::Chunked(state) => match state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                            return Ok(Step::More);
                        };
                        *state = match chunk_size(&line)? {
                            0 => Chunk::Trailers(0),
                            size => Chunk::Data(size),
                        };
                    }
                    Chunk::Data(left) => {
                        let step = take(buf, left);
                        if *left == 0 {
                            *state = Chunk::DataEnd;
                        }
                        return Ok(step);
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(H1Error::Invalid("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(line) = take_line(buf, MAX_TRAILERS.saturating_sub(*seen))? else {
                            return Ok(Step::More);
                        };
                        if line.is_empty() {
                            *self = Decoder::Done;
                            return Ok(Step::End);
                        }
                        *seen += line.len() + 2;
                    }
                },
            }
        }
    }

    /// The connection ended: the end of a close-delimited body, else a cut one.
    pub fn at_eof(&mut self) -> Result<(), H1Error> {
        match self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(H1Error::Truncated),
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done || *self == Decoder::Length(0)
    }
}

/// Up to `left` bytes of what `buf` holds.
fn take(buf: &mut BytesMut, left: &mut u64) -> Step {
    if buf.is_empty() {
        return Step::More;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |left| left.min(buf.len()));
    *left -= n as u64;
    Step::Data(buf.split_to(n).freeze())
}

/// One CRLF-ended line without its CRLF, if `buf` holds all of it.
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, H1Error> {
    let window = &buf[..buf.len().min(limit + 2)];
    match memchr::memchr(b'\n', window) {
        Some(end) if end > 0 && buf[end - 1] == b'\r' => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end - 1);
            Ok(Some(line))
        }
        Some(_) => Err(H1Error::Invalid("line not ended by CRLF")),
        None if buf.len() > limit => Err(H1Error::Invalid("line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then nothing or extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    if digits == 0 || digits > 15 || !matches!(rest.first(), None | Some(b';' | b' ' | b'\t')) {
        return Err(H1Error::Invalid("chunk size"));
    }
    line[..digits].iter().try_fold(0u64, |size, b| {
        let digit = (*b as char)
            .to_digit(16)
            .ok_or(H1Error::Invalid("chunk size"))?;
        Ok(size * 16 + u64::from(digit))
    })
}

/// The next piece of a body framed by `decoder`: from `buf`, then from what
/// `fill` reads into it. The end of the stream ends a close-delimited body
/// and cuts any other.
pub fn poll_body(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    mut fill: impl FnMut(&mut BytesMut, &mut Context<'_>) -> Poll<io::Result<usize>>,
) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
    loop {
        match decoder.decode(buf) {
            Err(e) => return Poll::Ready(Some(Err(e.into_io()))),
            Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Ok(Step::End) => return Poll::Ready(None),
            Ok(Step::More) => match ready!(fill(buf, cx)) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(0) => {
                    if let Err(e) = decoder.at_eof() {
                        return Poll::Ready(Some(Err(e.into_io())));
                    }
                }
                Ok(_) => {}
            },
        }
    }
}

/// The rest of a response body, read from its connection as it is sent on.
/// Streamed to the client, the connection closes with it.
pub struct UpstreamBody {
    conn: Conn,
    decoder: Decoder,
    keep_alive: bool,
}

impl UpstreamBody {
    pub fn new(conn: Conn, head: &Head) -> Self {
        UpstreamBody {
            conn,
            decoder: head.body,
            keep_alive: head.keep_alive,
        }
    }

    /// The next piece, read within `timer`; `None` at the end.
    pub async fn next_chunk(&mut self, timer: &mut ReadTimer) -> Result<Option<Bytes>, H1Error> {
        self.conn.next_chunk(&mut self.decoder, timer).await
    }

    /// The connection, when the body is read and the server keeps it open.
    pub fn into_reusable(self) -> Option<Conn> {
        (self.keep_alive && self.decoder.is_done()).then_some(self.conn)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let Conn { io, buf, .. } = &mut this.conn;
        poll_body(&mut this.decoder, buf, cx, |buf, cx| {
            buf.reserve(READ_SIZE);
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
        })
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(mut decoder: Decoder, input: &[u8]) -> Result<(Vec<u8>, Step), H1Error> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match decoder.decode(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                step => return Ok((out, step)),
            }
        }
    }

    #[test]
    fn field_names_are_the_names_http_parses() {
        for name in [
            "Server",
            "Date",
            "Connection",
            "Content-Type",
            "Content-Length",
            "Transfer-Encoding",
            "Vary",
            "Cache-Control",
            "Expires",
            "Last-Modified",
            "ETag",
            "Set-Cookie",
            "Location",
            "Accept-Ranges",
            "Content-Encoding",
            "Content-Language",
            "X-Frame-Options",
            "X-Content-Type-Options",
            "Referrer-Policy",
            "content-type",
            "CONTENT-LENGTH",
            "Cross-Origin-Opener-Policy",
            "X-Cache-Tags",
        ] {
            assert_eq!(
                field_name(name).unwrap(),
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "{name}"
            );
        }
        assert!(field_name("Bad Name").is_err());
        assert!(field_name("").is_err());
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let input = b"4;ext=1\r\nWiki\r\n5 ; x\r\npedia\r\n0\r\nExpires: never\r\n\r\nNEXT";
        let mut buf = BytesMut::from(&input[..]);
        let mut decoder = Decoder::Chunked(Chunk::Size);
        let mut out = Vec::new();
        while let Step::Data(d) = decoder.decode(&mut buf).unwrap() {
            out.extend_from_slice(&d);
        }
        assert_eq!(out, b"Wikipedia");
        assert!(decoder.is_done());
        // The next response's bytes are left for it.
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn a_chunked_body_split_anywhere_decodes_the_same() {
        let input = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..input.len() {
            let mut decoder = Decoder::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(&input[..cut]);
            let mut out = Vec::new();
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::More => break,
                    Step::End => panic!("ended before its last chunk at cut {cut}"),
                }
            }
            buf.extend_from_slice(&input[cut..]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::More => panic!("stalled at cut {cut}"),
                    Step::End => break,
                }
            }
            assert_eq!(out, b"0123456789abc", "cut at {cut}");
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for input in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"4x\r\nWiki\r\n",
            b"4\r\nWikiXX",
            b"4\nWiki\r\n",
            b"10000000000000000\r\n",
        ] {
            let result = decode_all(Decoder::Chunked(Chunk::Size), input);
            assert!(
                result.is_err(),
                "{:?} decoded as {:?}",
                String::from_utf8_lossy(input),
                result.ok()
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode_all(Decoder::Chunked(Chunk::Size), &long).is_err());
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let (out, step) = decode_all(Decoder::Length(3), b"abcdef").unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(step, Step::End);
        let mut cut = Decoder::Length(10);
        assert_eq!(decode_all(cut, b"abc").unwrap().1, Step::More);
        cut = Decoder::Length(10);
        assert!(matches!(cut.at_eof(), Err(H1Error::Truncated)));
        let mut close = Decoder::Close;
        assert!(close.at_eof().is_ok());
        assert!(close.is_done());
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = StatusCode::OK;
        let get = Method::GET;
        let f = |m: &Method, s, h: &[(&str, &str)]| {
            let map = headers(h);
            framing(m, s, &link(&map), &map)
        };
        assert_eq!(
            f(&Method::HEAD, ok, &[("content-length", "5")]).unwrap(),
            (Decoder::Done, true)
        );
        assert_eq!(
            f(&get, StatusCode::NOT_MODIFIED, &[("content-length", "5")]).unwrap(),
            (Decoder::Done, true)
        );
        assert_eq!(
            f(&get, StatusCode::NO_CONTENT, &[]).unwrap(),
            (Decoder::Done, true)
        );
        assert_eq!(
            f(&get, ok, &[("transfer-encoding", "gzip, chunked")]).unwrap(),
            (Decoder::Chunked(Chunk::Size), true)
        );
        // Both: chunked wins and the connection is not reused.
        assert_eq!(
            f(
                &get,
                ok,
                &[("transfer-encoding", "chunked"), ("content-length", "3")]
            )
            .unwrap(),
            (Decoder::Chunked(Chunk::Size), false)
        );
        assert_eq!(
            f(&get, ok, &[("transfer-encoding", "gzip")]).unwrap(),
            (Decoder::Close, false)
        );
        assert_eq!(
            f(&get, ok, &[("content-length", "7, 7")]).unwrap(),
            (Decoder::Length(7), true)
        );
        assert_eq!(
            f(
                &get,
                ok,
                &[("content-length", "7"), ("content-length", "7")]
            )
            .unwrap(),
            (Decoder::Length(7), true)
        );
        assert!(f(&get, ok, &[("content-length", "7, 8")]).is_err());
        assert!(f(&get, ok, &[("content-length", "-1")]).is_err());
        assert!(f(&get, ok, &[("content-length", "+7")]).is_err());
        assert!(f(&get, ok, &[("content-length", "")]).is_err());
        assert_eq!(f(&get, ok, &[]).unwrap(), (Decoder::Close, false));
    }

    /// What `parse_head` notes of these fields.
    fn link(map: &HeaderMap) -> Link {
        let mut link = Link::default();
        for (name, value) in map {
            link.keeps(name, value.as_bytes());
        }
        link
    }

    #[test]
    fn persistence_follows_the_version_and_connection_tokens() {
        let persistent = |v, h: &[(&str, &str)]| link(&headers(h)).persistent(v);
        assert!(persistent(Version::HTTP_11, &[]));
        assert!(!persistent(
            Version::HTTP_11,
            &[("connection", "foo, Close")]
        ));
        assert!(!persistent(Version::HTTP_10, &[]));
        assert!(persistent(
            Version::HTTP_10,
            &[("connection", "Keep-Alive")]
        ));
    }

    #[test]
    fn hop_by_hop_fields_are_read_and_not_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              Transfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.body, Decoder::Chunked(Chunk::Size));
        assert!(head.keep_alive);
        let names: Vec<&str> = head.parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        // A `Connection` naming another field stays, for the strip to follow.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.body, Decoder::Length(0));
        let mut headers = head.parts.headers;
        assert!(headers.contains_key(header::CONNECTION));
        super::super::super::headers::strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length"]);
    }

    #[test]
    fn request_heads_carry_every_field_and_the_chosen_host() {
        let fields = headers(&[("host", "example.com"), ("x-a", "1"), ("x-a", "2")]);
        let head = encode_head(&Method::POST, "/v1/x?q=1", &fields, None, b"");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/x?q=1 HTTP/1.1\r\nhost: example.com\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        let upstream = HeaderValue::from_static("127.0.0.1:8000");
        let head = encode_head(&Method::GET, "/", &fields, Some(&upstream), b"x-b: 3\r\n");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET / HTTP/1.1\r\nhost: 127.0.0.1:8000\r\nx-a: 1\r\nx-a: 2\r\nx-b: 3\r\n\r\n"
        );
    }

    /// Read one response (head, then body) from `stream` arriving in pieces
    /// cut at `cuts`, as `read_head` and `next_chunk` do, without a socket.
    /// `Ok` holds the body and the bytes left after it.
    fn read_response(stream: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = cuts
            .into_iter()
            .chain([stream.len()])
            .scan(0, |start, cut| {
                let piece = &stream[*start..cut];
                *start = cut;
                Some(piece)
            });
        let mut buf = BytesMut::new();
        let head = loop {
            if let Some(head) = parse_head(&mut buf, &Method::GET)? {
                if !head.parts.status.is_informational() {
                    break head;
                }
                continue;
            }
            match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return Err(H1Error::Truncated),
            }
        };
        let mut decoder = head.body;
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf)? {
                Step::Data(data) => body.extend_from_slice(&data),
                Step::End => {
                    // What the reads brought beyond the body, and what is still to come.
                    let rest = [&buf[..]].into_iter().chain(pieces).collect::<Vec<_>>();
                    return Ok((body, rest.concat()));
                }
                Step::More => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => {
                        decoder.at_eof()?;
                        return Ok((body, buf.to_vec()));
                    }
                },
            }
        }
    }

    proptest::proptest! {
        /// Gunicorn's bytes come from the network: whatever they are and
        /// however the reads split them, reading them is an answer or an
        /// error, never a panic.
        #[test]
        fn arbitrary_response_bytes_never_panic(
            head in proptest::sample::select(vec![
                &b""[..],
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                b"HTTP/1.0 200 OK\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\n",
            ]),
            stream in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..8),
        ) {
            let _ = read_response(&[head, &stream[..]].concat(), &cuts);
        }

        /// A chunked body, with extensions and trailers, decodes to its data
        /// however the reads split it, and leaves the next response's bytes.
        #[test]
        fn chunked_bodies_decode_the_same_however_reads_split(
            chunks in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), 0..6),
            extension in proptest::prelude::any::<bool>(),
            trailer in proptest::prelude::any::<bool>(),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..10),
        ) {
            let mut stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for chunk in &chunks {
                stream.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
                if extension {
                    stream.extend_from_slice(b";name=\"v\"");
                }
                stream.extend_from_slice(b"\r\n");
                stream.extend_from_slice(chunk);
                stream.extend_from_slice(b"\r\n");
            }
            stream.extend_from_slice(b"0\r\n");
            if trailer {
                stream.extend_from_slice(b"X-Checksum: 1\r\n");
            }
            stream.extend_from_slice(b"\r\nHTTP/1.1 204");
            let (body, rest) = read_response(&stream, &cuts).unwrap();
            proptest::prop_assert_eq!(body, chunks.concat());
            proptest::prop_assert_eq!(rest, b"HTTP/1.1 204".to_vec());
        }
    }
}
