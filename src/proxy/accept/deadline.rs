//! Deadlines beside the HTTP/1 head deadline (`http1`): the protocol sniff (a client that
//! sends nothing, or part of the HTTP/2 preface), HTTP/2 request headers (a
//! HEADERS frame without END_HEADERS, or one trickled byte by byte), and an
//! idle HTTP/2 connection. The watched stream records when bytes move and
//! follows HTTP/2 frame boundaries on the read side; a per-connection
//! watchdog closes what overstays.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Which protocol the client speaks, from its first bytes, within
/// `deadline`. `None`: it closed, or sent nothing (or only part of the
/// HTTP/2 preface) in time.
pub async fn sniff(stream: &TcpStream, deadline: Duration, http2: bool) -> Option<Protocol> {
    let sniffing = async {
        let mut buf = [0u8; 24];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if !http2 || !PREFACE.starts_with(&buf[..n]) {
                return Some(Protocol::Http1);
            }
            if n == PREFACE.len() {
                return Some(Protocol::Http2);
            }
            // Part of the preface: `peek` would answer again at once, so
            // wait a little for the rest.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(deadline, sniffing)
        .await
        .ok()
        .flatten()
}

/// What the watchdog reads about one connection.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last byte read from the client
    /// (what the gateway writes does not count: its own frames would keep a
    /// connection busy for ever), or of the last answered request.
    last_bytes_ms: AtomicU64,
    /// Milliseconds after `opened` since an HTTP/2 header block has been
    /// incomplete, plus one; 0 while none is.
    headers_since_ms: AtomicU64,
    /// Requests handed to the service and not yet answered.
    in_flight: AtomicUsize,
    /// The client accepted no bytes for `send_timeout`.
    pub send_timed_out: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_bytes_ms: AtomicU64::new(0),
            headers_since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            send_timed_out: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn bytes_moved(&self) {
        self.last_bytes_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request reached the service; the guard counts it until dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Why the connection must close now, if it must.
    pub fn overstayed(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<&'static str> {
        let now = self.now_ms();
        let since = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        let headers = self.headers_since_ms.load(Ordering::Relaxed);
        if headers != 0 && since(headers - 1) > header_timeout {
            return Some("header_timeout");
        }
        let idle = self.in_flight.load(Ordering::Relaxed) == 0
            && since(self.last_bytes_ms.load(Ordering::Relaxed)) > idle_timeout;
        idle.then_some("idle_timeout")
    }
}

/// Counts one request as in flight while alive.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.bytes_moved();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the HTTP/2 reader is in the client's byte stream.
#[derive(Debug)]
enum Frames {
    /// Skipping the preface (bytes left).
    Preface(usize),
    /// Reading a 9-byte frame header (bytes so far).
    Header([u8; 9], usize),
    /// Skipping a payload (bytes left), of a frame that is part of a header
    /// block or not.
    Payload(u64, bool),
}

/// HTTP/2 frame types that carry a header block (RFC 9113 §6.2, §6.10).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// A stream that tells `Activity` when the client sends and, for HTTP/2, whether
/// a header block is incomplete.
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    /// `None` for HTTP/1, whose connection keeps its own head deadline.
    frames: Option<Frames>,
    /// A HEADERS frame without END_HEADERS was read; its CONTINUATIONs are due.
    open_block: bool,
    /// How long a write may wait for the client to read (nginx send_timeout).
    send_timeout: Duration,
    /// Running while a write waits.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Watched<T> {
    pub fn new(
        inner: T,
        activity: Arc<Activity>,
        protocol: Protocol,
        send_timeout: Duration,
    ) -> Self {
        Watched {
            inner,
            activity,
            frames: (protocol == Protocol::Http2).then_some(Frames::Preface(PREFACE.len())),
            open_block: false,
            send_timeout,
            stalled: None,
        }
    }

    /// A write made progress, or is waiting: start or check the send timer.
    fn write_polled<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.activity.send_timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within send_timeout",
            )));
        }
        Poll::Pending
    }

    #[cfg(test)]
    fn observe(&mut self, data: &[u8]) {
        observe_frames(
            self.frames.as_mut(),
            &mut self.open_block,
            &self.activity,
            data,
        );
    }
}

/// Follow HTTP/2 frame boundaries through `data`, the next bytes read, and
/// record in `activity` whether a header block is incomplete.
fn observe_frames(
    frames: Option<&mut Frames>,
    open_block: &mut bool,
    activity: &Activity,
    mut data: &[u8],
) {
    let Some(frames) = frames else {
        return;
    };
    while !data.is_empty() {
        match frames {
            Frames::Preface(left) => {
                let n = (*left).min(data.len());
                data = &data[n..];
                *left -= n;
                if *left == 0 {
                    *frames = Frames::Header([0; 9], 0);
                }
            }
            Frames::Header(header, have) => {
                let n = (9 - *have).min(data.len());
                header[*have..*have + n].copy_from_slice(&data[..n]);
                *have += n;
                data = &data[n..];
                if *have == 9 {
                    let length = u64::from(header[0]) << 16
                        | u64::from(header[1]) << 8
                        | u64::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let in_block = kind == HEADERS || kind == CONTINUATION;
                    if in_block {
                        *open_block = flags & END_HEADERS == 0;
                    }
                    *frames = if length == 0 {
                        Frames::Header([0; 9], 0)
                    } else {
                        Frames::Payload(length, in_block)
                    };
                }
            }
            Frames::Payload(left, _) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                data = &data[n..];
                *left -= n as u64;
                if *left == 0 {
                    *frames = Frames::Header([0; 9], 0);
                }
            }
        }
    }
    // Incomplete: a block still waiting for CONTINUATION, or a frame of
    // a block whose bytes have not all arrived.
    let pending = *open_block
        || matches!(frames, Frames::Payload(_, true))
        || (matches!(frames, Frames::Header(h, have) if *have > 3 && (h[3] == HEADERS || h[3] == CONTINUATION)));
    let since = &activity.headers_since_ms;
    if !pending {
        since.store(0, Ordering::Relaxed);
    } else if since.load(Ordering::Relaxed) == 0 {
        since.store(activity.now_ms() + 1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            // Only HTTP/2 is watched for idleness here; `http1` keeps
            // HTTP/1.1's own timers, and a clock read per read is not free.
            if buf.filled().len() > before && this.frames.is_some() {
                this.activity.bytes_moved();
                let filled = &buf.filled()[before..];
                observe_frames(
                    this.frames.as_mut(),
                    &mut this.open_block,
                    &this.activity,
                    filled,
                );
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_polled(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_polled(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_polled(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut out = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        out.extend_from_slice(payload);
        out
    }

    fn pending(w: &Watched<()>) -> bool {
        w.activity.headers_since_ms.load(Ordering::Relaxed) != 0
    }

    #[test]
    fn header_blocks_are_followed_across_reads() {
        let mut w = Watched::new((), Activity::new(), Protocol::Http2, Duration::from_secs(1));
        w.observe(PREFACE);
        w.observe(&frame(0x4, 0, &[0; 6])); // SETTINGS
        assert!(!pending(&w));
        w.observe(&frame(HEADERS, 0, b"abc"));
        assert!(pending(&w), "HEADERS without END_HEADERS");
        let continuation = frame(CONTINUATION, END_HEADERS, b"defgh");
        w.observe(&continuation[..11]);
        assert!(pending(&w), "the last CONTINUATION has not all arrived");
        w.observe(&continuation[11..]);
        assert!(!pending(&w));
        let whole = frame(HEADERS, END_HEADERS, b"xyz");
        w.observe(&whole[..5]);
        assert!(pending(&w), "a HEADERS frame trickled in");
        w.observe(&whole[5..]);
        assert!(!pending(&w));
        w.observe(&frame(0x0, 0, b"body")); // DATA
        assert!(!pending(&w));
    }

    #[test]
    fn http1_is_not_parsed() {
        let mut w = Watched::new((), Activity::new(), Protocol::Http1, Duration::from_secs(1));
        w.observe(b"GET / HTTP/1.1\r\n");
        assert!(!pending(&w));
    }
}
