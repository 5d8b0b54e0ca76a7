//! A read-side watch on HTTP/1 framing. hyper quietly resolves a request that
//! carries both `Content-Length` and `Transfer-Encoding` (it drops the length),
//! so the handler cannot see the shape; RFC 9112 §6.1 lets a server reject it,
//! and a gateway must, because the next hop may frame it differently. This
//! wrapper follows request boundaries in the bytes hyper reads and records the
//! index of the first request with that shape; the `accept` phase answers that
//! request with 400 and closes the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the reader learned, shared with the connection's service.
#[derive(Debug, Default)]
pub struct FramingVerdicts {
    /// Index (0-based) of the first request head with both framing headers;
    /// `u64::MAX` while there is none.
    first_ambiguous: AtomicU64,
    /// Requests the service has seen on this connection.
    served: AtomicU64,
}

impl FramingVerdicts {
    pub fn new() -> Arc<Self> {
        Arc::new(FramingVerdicts {
            first_ambiguous: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
        })
    }

    /// Called once per request by the service, in order: is this one ambiguous?
    pub fn next_request_is_ambiguous(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        self.first_ambiguous.load(Ordering::Relaxed) == index
    }
}

/// Where in the byte stream the reader is.
#[derive(Debug)]
enum State {
    /// Reading a request head; holds the part of it seen so far.
    Head(Vec<u8>),
    /// Skipping a body of known length.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after chunk data.
    ChunkEnd(u8),
    /// Reading trailer lines until an empty one.
    Trailer(Vec<u8>),
    /// Nothing more to watch: an HTTP/2 preface, a shape hyper rejects
    /// itself, or a connection already condemned.
    Off,
}

pub struct FramingGuard<T> {
    inner: T,
    state: State,
    heads: u64,
    max_head: usize,
    verdicts: Arc<FramingVerdicts>,
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, max_head: usize, verdicts: Arc<FramingVerdicts>) -> Self {
        FramingGuard {
            inner,
            state: State::Head(Vec::new()),
            heads: 0,
            max_head,
            verdicts,
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let state = std::mem::replace(&mut self.state, State::Off);
            let (next, used) = self.step(state, data);
            self.state = next;
            data = &data[used..];
            if matches!(self.state, State::Off) {
                return;
            }
        }
    }

    /// Advance over a prefix of `data`; returns the new state and bytes used.
    fn step(&mut self, state: State, data: &[u8]) -> (State, usize) {
        match state {
            State::Off => (State::Off, data.len()),
            // The usual case: a whole head inside one read, parsed in place.
            State::Head(seen) if seen.is_empty() => match head_end(data) {
                Some(i) => (self.on_head(&data[..i + 4]), i + 4),
                None if data.len() > self.max_head => (State::Off, data.len()),
                None => (State::Head(data.to_vec()), data.len()),
            },
            State::Head(mut seen) => {
                let start = seen.len();
                seen.extend_from_slice(data);
                let Some(end) = head_end(&seen).map(|i| i + 4) else {
                    if seen.len() > self.max_head {
                        return (State::Off, data.len());
                    }
                    return (State::Head(seen), data.len());
                };
                let used = end - start;
                let next = self.on_head(&seen[..end]);
                (next, used)
            }
            State::Body(left) => {
                let n = left.min(data.len() as u64);
                let left = left - n;
                let next = if left == 0 {
                    State::Head(Vec::new())
                } else {
                    State::Body(left)
                };
                // `n` is at most `data.len()`, so it fits in usize.
                (next, usize::try_from(n).unwrap_or(data.len()))
            }
            State::ChunkSize(line) => Self::line(line, data, State::ChunkSize, |line| {
                let text = std::str::from_utf8(line).ok()?;
                let size = text.split(';').next()?.trim();
                let size = u64::from_str_radix(size, 16).ok()?;
                Some(if size == 0 {
                    State::Trailer(Vec::new())
                } else {
                    State::ChunkData(size)
                })
            }),
            State::ChunkData(left) => {
                let n = left.min(data.len() as u64);
                let left = left - n;
                let next = if left == 0 {
                    State::ChunkEnd(2)
                } else {
                    State::ChunkData(left)
                };
                (next, usize::try_from(n).unwrap_or(data.len()))
            }
            State::ChunkEnd(left) => {
                let n = usize::from(left).min(data.len());
                // n <= 2
                let left = left - n as u8;
                let next = if left == 0 {
                    State::ChunkSize(Vec::new())
                } else {
                    State::ChunkEnd(left)
                };
                (next, n)
            }
            State::Trailer(line) => Self::line(line, data, State::Trailer, |line| {
                Some(if line.is_empty() {
                    State::Head(Vec::new())
                } else {
                    State::Trailer(Vec::new())
                })
            }),
        }
    }

    /// Collect one CRLF-terminated line, then decide with `on_line` (given the
    /// line without CRLF); `None` from it, or an overlong line, turns off.
    fn line(
        mut line: Vec<u8>,
        data: &[u8],
        partial: fn(Vec<u8>) -> State,
        on_line: impl FnOnce(&[u8]) -> Option<State>,
    ) -> (State, usize) {
        match data.iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&data[..i]);
                let content = line.strip_suffix(b"\r").unwrap_or(&line);
                (on_line(content).unwrap_or(State::Off), i + 1)
            }
            None if line.len() + data.len() > 4096 => (State::Off, data.len()),
            None => {
                line.extend_from_slice(data);
                (partial(line), data.len())
            }
        }
    }

    fn on_head(&mut self, head: &[u8]) -> State {
        let index = self.heads;
        self.heads += 1;
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Off;
        }
        // Most heads (every GET from a browser) frame no body: nothing to
        // parse, and the next bytes are the next head.
        if !names_framing(head) {
            return State::Head(Vec::new());
        }
        self.parse_framing(head, index)
    }

    /// The framing a head's fields give its body, or the verdict on it.
    fn parse_framing(&self, head: &[u8], index: u64) -> State {
        // Left uninitialised, as in the upstream client: filling 128 empty
        // fields for every request costs more than parsing a small head.
        let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut request = httparse::Request::new(&mut []);
        let Ok(httparse::Status::Complete(_)) = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut request, head, &mut fields)
        else {
            // hyper rejects what httparse rejects.
            return State::Off;
        };
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut has_length = false;
        let mut has_encoding = false;
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                has_length = true;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                has_encoding = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
        }
        if has_length && has_encoding {
            let _ = self.verdicts.first_ambiguous.compare_exchange(
                u64::MAX,
                index,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return State::Off;
        }
        match (chunked, length) {
            (true, _) => State::ChunkSize(Vec::new()),
            (false, Some(0)) | (false, None) if !has_encoding => State::Head(Vec::new()),
            (false, Some(n)) => State::Body(n),
            // Non-chunked Transfer-Encoding: hyper answers 400 itself.
            (false, None) => State::Off,
        }
    }
}

/// Whether a line of `head` may be a `Content-Length` or `Transfer-Encoding`
/// field: one that begins with either name, in any case. Every field a
/// parser finds begins a line, so `false` means the head has neither.
fn names_framing(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| {
        let line = &head[i + 1..];
        let starts = |name: &[u8]| {
            line.get(..name.len())
                .is_some_and(|l| l.eq_ignore_ascii_case(name))
        };
        starts(b"content-length") || starts(b"transfer-encoding")
    })
}

/// Where a head's blank line begins. The searcher is built once: building
/// one per call cost more than the search in a short head.
fn head_end(haystack: &[u8]) -> Option<usize> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    FINDER.find(haystack)
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if !matches!(this.state, State::Off) {
                this.observe(&buf.filled()[before..]);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feed `stream` to a guard in pieces cut at `cuts`; return the verdict.
    fn first_ambiguous(stream: &[u8], cuts: &[usize]) -> Option<u64> {
        let verdicts = FramingVerdicts::new();
        let mut guard = FramingGuard::new((), 16 * 1024, Arc::clone(&verdicts));
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            guard.observe(&stream[start..cut]);
            start = cut;
        }
        let index = verdicts.first_ambiguous.load(Ordering::Relaxed);
        (index != u64::MAX).then_some(index)
    }

    const PLAIN: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    const SIZED: &[u8] = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /";
    const CHUNKED: &[u8] = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        4;ext=1\r\n\r\n\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n";
    const AMBIGUOUS: &[u8] = b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn bodies_that_look_like_heads_are_skipped() {
        // The sized and chunked bodies contain "GET /" and blank lines.
        let stream = [PLAIN, SIZED, CHUNKED, AMBIGUOUS].concat();
        assert_eq!(first_ambiguous(&stream, &[]), Some(3));
        assert_eq!(
            first_ambiguous(&[PLAIN, SIZED, CHUNKED].concat(), &[]),
            None
        );
    }

    #[test]
    fn framing_names_are_found_in_any_case() {
        let odd_case = b"POST /e HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 3\r\n\
            TRANSFER-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(first_ambiguous(odd_case, &[]), Some(0));
        // A body sized in odd case is still skipped, not read as a head.
        let sized = b"POST /f HTTP/1.1\r\nhost: x\r\nCONTENT-LENGTH: 5\r\n\r\nGET /";
        assert_eq!(first_ambiguous(&[sized, AMBIGUOUS].concat(), &[]), Some(1));
        assert!(!names_framing(PLAIN));
        assert!(!names_framing(
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\n\r\n"
        ));
    }

    proptest! {
        #[test]
        fn verdict_does_not_depend_on_how_reads_split(
            order in proptest::collection::vec(0usize..3, 0..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let parts = [PLAIN, SIZED, CHUNKED];
            let mut stream: Vec<u8> = order.iter().flat_map(|i| parts[*i].to_vec()).collect();
            stream.extend_from_slice(AMBIGUOUS);
            prop_assert_eq!(first_ambiguous(&stream, &cuts), Some(order.len() as u64));
        }

        /// Skipping the parse of a head that names no framing field gives
        /// what the parse gives: the next head, or nothing more to watch.
        #[test]
        fn heads_without_framing_names_need_no_parse(
            lines in proptest::collection::vec(proptest::sample::select(vec![
                &b"Host: x"[..], b"X-Content-Length: 4", b"Content-Type: text/plain",
                b"Accept: */*", b"content-lengthy: 1", b"X: Transfer-Encoding: chunked",
                b" folded", b"Bad Line", b"Cookie: a=1",
            ]), 0..8),
        ) {
            let mut head = b"GET /g HTTP/1.1\r\n".to_vec();
            for line in &lines {
                head.extend_from_slice(line);
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"\r\n");
            let guard = FramingGuard::new((), 16 * 1024, FramingVerdicts::new());
            let parsed = guard.parse_framing(&head, 0);
            if names_framing(&head) {
                // Only the odd `content-lengthy` line brings the parse in.
                prop_assert!(lines.contains(&&b"content-lengthy: 1"[..]));
            } else if lines.iter().any(|l| *l == b" folded" || *l == b"Bad Line") {
                // hyper refuses such a head and closes the connection, so
                // the parse's `Off` and the skip's next head end alike.
                prop_assert!(matches!(parsed, State::Off), "{:?}", parsed);
            } else {
                prop_assert!(
                    matches!(parsed, State::Head(ref seen) if seen.is_empty()),
                    "{:?}", parsed
                );
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            stream in proptest::collection::vec(any::<u8>(), 0..2048),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let _ = first_ambiguous(&stream, &cuts);
        }
    }
}
