//! The `log` phase: one access-log line and the request metrics per request,
//! written when the response has been sent or abandoned, so that the line
//! carries the bytes really sent. A client that goes away before its
//! response gets a line with status 499, as nginx logs it.
//!
//! Lines are formatted into a buffer per worker thread and handed in batches
//! to one writer thread, so a slow disk or a full pipe never blocks a
//! worker: when the writer falls behind, lines are dropped and counted.
//! SIGUSR1 reopens the file, for logrotate.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

use super::Shared;
use super::body::ProxyBody;
use crate::config::LogFormat;

/// A worker hands its buffer over once it holds this much.
const BATCH: usize = 32 * 1024;
/// Batches waiting for the writer; past that, lines are dropped.
const QUEUE: usize = 256;
/// Workers hand over whatever they hold at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

enum Message {
    Lines(Vec<u8>),
    /// Open the file again (or another one; `None`: standard error).
    Open(Option<PathBuf>),
}

/// Where access-log lines go: a file or standard error, written by one thread.
pub struct AccessLog {
    sender: SyncSender<Message>,
    dropped: IntCounter,
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(BATCH));
}

impl AccessLog {
    /// Start the writer thread. The file is opened (created, appended to)
    /// before this returns, so a bad path is an error at start.
    pub fn start(path: Option<PathBuf>, dropped: IntCounter) -> io::Result<Self> {
        let destination = Destination::open(path.clone())?;
        let (sender, receiver) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("gatehouse-access-log".into())
            .spawn(move || write_lines(destination, &receiver))?;
        Ok(AccessLog { sender, dropped })
    }

    /// Reopen the file (SIGUSR1), or switch to another path after a reload.
    pub fn reopen(&self, path: Option<PathBuf>) {
        let _ = self.sender.send(Message::Open(path));
    }

    /// Append one line to this thread's buffer; hand the buffer over when full.
    fn append(&self, format: impl FnOnce(&mut Vec<u8>)) {
        let full = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            format(&mut buffer);
            buffer.push(b'\n');
            (buffer.len() >= BATCH)
                .then(|| std::mem::replace(&mut *buffer, Vec::with_capacity(BATCH)))
        });
        if let Some(lines) = full {
            self.send(lines);
        }
    }

    /// Hand this thread's lines to the writer (a worker's timer calls this).
    pub fn flush(&self) {
        let lines = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            (!buffer.is_empty()).then(|| std::mem::replace(&mut *buffer, Vec::with_capacity(BATCH)))
        });
        if let Some(lines) = lines {
            self.send(lines);
        }
    }

    fn send(&self, lines: Vec<u8>) {
        let count = memchr::memchr_iter(b'\n', &lines).count() as u64;
        match self.sender.try_send(Message::Lines(lines)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc_by(count);
            }
        }
    }
}

/// Standard error or an open file.
enum Destination {
    Stderr,
    File(PathBuf, File),
}

impl Destination {
    fn open(path: Option<PathBuf>) -> io::Result<Self> {
        match path {
            None => Ok(Destination::Stderr),
            Some(path) => {
                let file = OpenOptions::new().create(true).append(true).open(&path)?;
                Ok(Destination::File(path, file))
            }
        }
    }

    fn write(&mut self, lines: &[u8]) -> io::Result<()> {
        match self {
            Destination::File(_, file) => file.write_all(lines),
            // A pipe keeps writes of at most 4 KiB whole; beyond that another
            // writer's line could land inside ours. Write whole lines in
            // pieces below that.
            Destination::Stderr => {
                let mut stderr = io::stderr().lock();
                let mut rest = lines;
                while !rest.is_empty() {
                    let cut = if rest.len() <= 4096 {
                        rest.len()
                    } else {
                        rest[..4096]
                            .iter()
                            .rposition(|b| *b == b'\n')
                            .map_or(4096, |i| i + 1)
                    };
                    stderr.write_all(&rest[..cut])?;
                    rest = &rest[cut..];
                }
                Ok(())
            }
        }
    }
}

fn write_lines(mut destination: Destination, receiver: &Receiver<Message>) {
    while let Ok(message) = receiver.recv() {
        match message {
            Message::Lines(lines) => {
                if let Err(e) = destination.write(&lines) {
                    tracing::warn!(error = %e, "writing the access log");
                }
            }
            Message::Open(path) => {
                let path = path.or(match &destination {
                    Destination::File(path, _) => Some(path.clone()),
                    Destination::Stderr => None,
                });
                match Destination::open(path) {
                    Ok(next) => destination = next,
                    Err(e) => {
                        tracing::error!(error = %e, "reopening the access log; keeping the old file")
                    }
                }
            }
        }
    }
}

/// Everything the line and the metrics need, taken from the exchange.
pub struct AccessRecord {
    pub shared: Arc<Shared>,
    /// `None`: `log.access_log` is off.
    pub format: Option<LogFormat>,
    pub request_id: HeaderValue,
    pub client: IpAddr,
    pub method: Method,
    /// The request target; its path and query are logged.
    pub target: http::Uri,
    pub version: Version,
    pub status: u16,
    pub route: Arc<str>,
    pub started: Instant,
    pub upstream: Option<Arc<str>>,
    pub upstream_time: Option<Duration>,
}

impl AccessRecord {
    /// The line and the byte and abort metrics, once the response is over.
    /// `complete`: the whole body went out.
    pub fn finish(self, bytes: u64, complete: bool) {
        let metrics = &self.shared.metrics;
        metrics.bytes_sent.inc_by(bytes);
        if !complete {
            let stage = if self.status == 499 {
                "before_response"
            } else {
                "during_response"
            };
            metrics.client_aborts.with_label_values(&[stage]).inc();
        }
        let Some(format) = self.format else {
            return;
        };
        let elapsed = self.started.elapsed();
        self.shared.access_log.append(|out| match format {
            LogFormat::Text => self.text(out, bytes, complete, elapsed),
            LogFormat::Json => self.json(out, bytes, complete, elapsed),
        });
    }

    fn path(&self) -> &str {
        self.target.path_and_query().map_or("/", |p| p.as_str())
    }

    /// Written straight into the worker's buffer: no line of its own, the
    /// date part of the timestamp made once a second, and quoting that only
    /// escapes what needs it.
    fn text(&self, out: &mut Vec<u8>, bytes: u64, complete: bool, elapsed: Duration) {
        timestamp(out, SystemTime::now());
        out.extend_from_slice(b"  INFO access: request_id=");
        out.extend_from_slice(self.request_id.to_str().unwrap_or("-").as_bytes());
        out.extend_from_slice(b" client=");
        crate::net::write_ip_bytes(out, self.client);
        out.extend_from_slice(b" method=");
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.extend_from_slice(b" path=");
        quoted(out, self.path());
        out.extend_from_slice(b" version=");
        out.extend_from_slice(version_name(self.version).as_bytes());
        out.extend_from_slice(b" status=");
        decimal(out, u64::from(self.status));
        out.extend_from_slice(b" bytes=");
        decimal(out, bytes);
        out.extend_from_slice(b" route=");
        quoted(out, &self.route);
        out.extend_from_slice(b" duration_ms=");
        milliseconds(out, elapsed);
        match (&self.upstream, self.upstream_time) {
            (Some(upstream), Some(time)) => {
                out.extend_from_slice(b" upstream=");
                quoted(out, upstream);
                out.extend_from_slice(b" upstream_ms=");
                milliseconds(out, time);
            }
            _ => out.extend_from_slice(b" upstream=\"-\""),
        }
        if !complete {
            out.extend_from_slice(b" completed=false");
        }
    }

    fn json(&self, out: &mut Vec<u8>, bytes: u64, complete: bool, elapsed: Duration) {
        let value = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "level": "INFO",
            "target": "access",
            "request_id": self.request_id.to_str().unwrap_or("-"),
            "client": self.client.to_string(),
            "method": self.method.as_str(),
            "path": self.path(),
            "version": version_name(self.version),
            "status": self.status,
            "bytes": bytes,
            "route": &*self.route,
            "duration_ms": millis(elapsed),
            "upstream": self.upstream.as_deref().unwrap_or("-"),
            "upstream_ms": self.upstream_time.map(millis),
            "completed": complete,
        });
        let _ = serde_json::to_writer(out, &value);
    }
}

/// Milliseconds with microsecond precision, as the access log shows them.
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// `millis` written as the text line shows it (`12`, `0.5`, `3.071`),
/// without going through a float.
fn milliseconds(out: &mut Vec<u8>, duration: Duration) {
    let micros = (duration.as_nanos() + 500) / 1000;
    let micros = u64::try_from(micros).unwrap_or(u64::MAX);
    decimal(out, micros / 1000);
    let mut fraction = micros % 1000;
    if fraction != 0 {
        out.push(b'.');
        let mut digits = 3;
        while fraction % 10 == 0 {
            fraction /= 10;
            digits -= 1;
        }
        padded(out, fraction, digits);
    }
}

fn decimal(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// `value` in decimal, with leading zeros to at least `width` digits (≤ 20).
fn padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(value).as_bytes();
    let zeros = width.min(20).saturating_sub(digits.len());
    out.extend_from_slice(&[b'0'; 20][..zeros]);
    out.extend_from_slice(digits);
}

/// A string in double quotes, escaped as Rust's `{:?}` escapes it; the
/// common case (printable ASCII, no quote or backslash) is copied as is.
fn quoted(out: &mut Vec<u8>, value: &str) {
    use std::io::Write as _;
    // No early exit: values are almost always plain, and for them a check
    // without a branch per byte is the cheaper one.
    let plain = value.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

thread_local! {
    /// The second the date part below was made for, and that part
    /// (`2026-12-06T14:23:45.`).
    static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// RFC 3339 with microseconds, UTC, as the other log lines have it.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != since.as_secs() {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            let formatted = humantime::format_rfc3339_seconds(whole).to_string();
            second.1.clear();
            second
                .1
                .extend_from_slice(formatted.trim_end_matches('Z').as_bytes());
            second.1.push(b'.');
            second.0 = since.as_secs();
        }
        out.extend_from_slice(&second.1);
    });
    padded(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// The response body as sent: counts its bytes and finishes the access
/// record when the last byte is out or the body is dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    record: Option<AccessRecord>,
    sent: u64,
}

impl LoggedBody {
    pub fn new(inner: ProxyBody, record: Option<AccessRecord>) -> Self {
        LoggedBody {
            inner,
            record,
            sent: 0,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(record) = self.record.take() {
            record.finish(self.sent, complete);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // An empty body (or a HEAD response's) is dropped without being polled.
        let head = self
            .record
            .as_ref()
            .is_some_and(|r| r.method == Method::HEAD);
        let complete = head || self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn milliseconds_read_as_the_float_they_stand_for() {
        for nanos in [
            0,
            1,
            499,
            500,
            999,
            1_000,
            1_500,
            7_000,
            50_000,
            10_000,
            100_000,
            123_456,
            999_499,
            999_500,
            1_000_000,
            1_000_001,
            12_000_000,
            12_340_000,
            3_071_000,
            987_654_321_012,
        ] {
            let d = Duration::from_nanos(nanos);
            assert_eq!(
                written(|out| milliseconds(out, d)),
                millis(d).to_string(),
                "{nanos} ns"
            );
        }
    }

    #[test]
    fn timestamps_match_rfc3339_with_microseconds() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_562_225);
        for offset in [
            0,
            1_000,
            7_000,
            999_999_000,
            1_000_000_000,
            86_400_000_001_000,
        ] {
            let at = base + Duration::from_nanos(offset);
            assert_eq!(
                written(|out| timestamp(out, at)),
                humantime::format_rfc3339_micros(at).to_string(),
                "{offset}"
            );
        }
    }

    #[test]
    fn quoting_escapes_as_debug_does() {
        for value in [
            "/v1/stories/?page=3",
            "",
            "a\"b",
            "back\\slash",
            "tab\there",
            "é/ü",
            "\u{7f}",
            "it's",
        ] {
            assert_eq!(written(|out| quoted(out, value)), format!("{value:?}"));
        }
    }

    #[test]
    fn decimals_and_versions() {
        for value in [0, 7, 10, 499, 65_535, u64::MAX] {
            assert_eq!(written(|out| decimal(out, value)), value.to_string());
        }
        for version in [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ] {
            assert_eq!(version_name(version), format!("{version:?}"));
        }
    }
}
