//! Sending a large stored body without copying it into the socket, as
//! nginx's `sendfile on` sends a cached file.
//!
//! A [`FileCopy`] holds a body's bytes and the same bytes in a sealed
//! memory file. The body that sends them [`offer`]s the copy to its thread
//! before it hands the bytes to the connection; when [`ZeroCopy`]'s write then gets
//! a slice lying inside those bytes, it sends that range from the file with
//! `sendfile(2)`: the socket takes references to the file's pages instead of
//! a copy of the data (25% of the CPU a 64 KiB cache hit costs, measured).
//!
//! A slice is matched by address: the offered copy holds its bytes alive,
//! so no other allocation can lie at those addresses, and bytes never
//! change, so the file holds exactly what the slice does. A slice that does
//! not match, or a `sendfile` that fails for any reason but a full socket,
//! is written the ordinary way.

use std::cell::RefCell;
use std::io::{self, IoSlice, Write};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::SendFlags;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Memory files alive in this process. Each is an open file, so they are
/// capped well below the open-file limit the connections need.
static FILES: AtomicUsize = AtomicUsize::new(0);
/// Bytes sent from memory files.
static SENT: AtomicU64 = AtomicU64::new(0);

/// A body's bytes, and the same bytes in a sealed memory file.
pub struct FileCopy {
    bytes: Bytes,
    file: OwnedFd,
}

impl std::fmt::Debug for FileCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCopy")
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl FileCopy {
    /// A sealed memory file holding `bytes`; `None` when one cannot be made
    /// or too many are open already (the bytes are then sent by copy).
    pub fn new(bytes: &Bytes) -> Option<Arc<FileCopy>> {
        let cap = open_file_limit() / 8;
        if FILES.fetch_add(1, Ordering::Relaxed) >= cap {
            FILES.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match Self::make(bytes) {
            Ok(file) => Some(Arc::new(FileCopy {
                bytes: bytes.clone(),
                file,
            })),
            Err(e) => {
                FILES.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "no memory file for a stored body; it is sent by copy");
                None
            }
        }
    }

    fn make(bytes: &[u8]) -> io::Result<OwnedFd> {
        let fd = rustix::fs::memfd_create(
            "gatehouse-body",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        // Sealed: the pages a socket still references can never change.
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )?;
        Ok(OwnedFd::from(file))
    }

    /// Where `slice` starts in these bytes, when it lies wholly inside them.
    fn offset_of(&self, slice: &[u8]) -> Option<u64> {
        let start = self.bytes.as_ptr().addr();
        let at = slice.as_ptr().addr().checked_sub(start)?;
        (!slice.is_empty() && at + slice.len() <= self.bytes.len()).then_some(at as u64)
    }
}

impl Drop for FileCopy {
    fn drop(&mut self) {
        FILES.fetch_sub(1, Ordering::Relaxed);
    }
}

fn open_file_limit() -> usize {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1024)
}

thread_local! {
    /// The copy most recently offered on this thread.
    static OFFERED: RefCell<Option<Arc<FileCopy>>> = const { RefCell::new(None) };
}

/// The bytes of `copy` are about to be written on this thread.
pub fn offer(copy: &Arc<FileCopy>) {
    OFFERED.with(|offered| {
        let mut offered = offered.borrow_mut();
        if !offered.as_ref().is_some_and(|o| Arc::ptr_eq(o, copy)) {
            *offered = Some(Arc::clone(copy));
        }
    });
}

/// The offered copy and where `slice` starts in it, if it lies inside.
fn matching(slice: &[u8]) -> Option<(Arc<FileCopy>, u64)> {
    OFFERED.with(|offered| {
        let offered = offered.borrow();
        let copy = offered.as_ref()?;
        copy.offset_of(slice).map(|at| (Arc::clone(copy), at))
    })
}

/// Memory files open now (`gatehouse_cache_l1_files`).
pub fn files() -> usize {
    FILES.load(Ordering::Relaxed)
}

/// Bytes sent from memory files so far.
pub fn sent() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// A client connection whose writes send offered bodies from their files.
pub struct ZeroCopy {
    inner: TcpStream,
    /// Off for HTTP/2: a body goes out in frames of 16 KiB, each too small
    /// for a write of its own to beat a copy.
    on: bool,
}

impl ZeroCopy {
    pub fn new(inner: TcpStream, on: bool) -> Self {
        ZeroCopy { inner, on }
    }

    /// Run a non-blocking send once the socket is writable.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        mut send: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            match self.inner.try_io(Interest::WRITABLE, || send(&self.inner)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    /// Send `len` bytes of `copy` from `at`; on any error the caller writes
    /// the same bytes by copy, which fails again if the connection is gone.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        copy: &FileCopy,
        at: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let sent = ready!(self.poll_send(cx, |socket| {
            let mut offset = at;
            rustix::fs::sendfile(socket, &copy.file, Some(&mut offset), len).map_err(Into::into)
        }));
        match sent {
            Ok(n) if n > 0 => {
                SENT.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            // Nothing sent (the file shorter than the bytes, which sealing
            // rules out): the caller writes by copy.
            Ok(_) => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for ZeroCopy {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopy {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some((copy, at)) = matching(buf).filter(|_| this.on) {
            match this.poll_sendfile(cx, &copy, at, buf.len()) {
                Poll::Ready(Err(_)) => {}
                polled => return polled,
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let found = bufs
            .iter()
            .take_while(|_| this.on)
            .enumerate()
            .find_map(|(i, b)| matching(b).map(|(copy, at)| (i, copy, at)));
        match found {
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            // The head before the body goes first, held back (MSG_MORE) so
            // that it leaves in one segment with the body's start.
            Some((i, _, _)) if i > 0 => {
                let head: &[u8] = &bufs[0];
                match this.poll_send(cx, |socket| {
                    rustix::net::send(socket, head, SendFlags::MORE | SendFlags::NOSIGNAL)
                        .map_err(Into::into)
                }) {
                    Poll::Ready(Err(_)) => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
                    polled => polled,
                }
            }
            Some((_, copy, at)) => match this.poll_sendfile(cx, &copy, at, bufs[0].len()) {
                Poll::Ready(Err(_)) => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
                polled => polled,
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Bytes whose value changes with their place, so that a range sent
    /// from the wrong offset shows.
    fn pattern(len: usize) -> Bytes {
        (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    /// A connected pair: the writer's side wrapped, the reader's plain.
    async fn pair(on: bool) -> (ZeroCopy, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (ZeroCopy::new(accepted.unwrap().0, on), client.unwrap())
    }

    /// Write `slices` as a connection does (vectored, again from where a partial
    /// write stopped) while the other side reads `expected.len()` bytes.
    async fn write_and_read(on: bool, slices: Vec<Bytes>, expected: Vec<u8>) -> Vec<u8> {
        let (mut writer, mut reader) = pair(on).await;
        let write = async move {
            let mut slices: std::collections::VecDeque<Bytes> = slices.into();
            while !slices.is_empty() {
                let bufs: Vec<IoSlice<'_>> = slices.iter().map(|b| IoSlice::new(b)).collect();
                let mut n = writer.write_vectored(&bufs).await.unwrap();
                while n > 0 {
                    let first = slices.front_mut().unwrap();
                    let used = n.min(first.len());
                    let _ = first.split_to(used);
                    n -= used;
                    if first.is_empty() {
                        slices.pop_front();
                    }
                }
            }
            writer
        };
        let read = async move {
            let mut got = vec![0; expected.len()];
            reader.read_exact(&mut got).await.unwrap();
            got
        };
        let (_writer, got) = tokio::join!(write, read);
        got
    }

    #[tokio::test]
    async fn an_offered_body_arrives_whole_after_its_head_and_from_the_file() {
        let body = pattern(300_000);
        let copy = FileCopy::new(&body).expect("a memory file");
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n");
        let mut expected = head.to_vec();
        expected.extend_from_slice(&body);
        // A sub-slice starts at its own offset in the file.
        let tail = body.slice(100_001..);
        expected.extend_from_slice(&tail);
        offer(&copy);
        let before = sent();
        let got = write_and_read(true, vec![head, body.clone(), tail], expected.clone()).await;
        assert!(got == expected, "the bytes read differ from those written");
        assert!(
            sent() - before >= 300_000 + 199_999,
            "the body was not sent from the file"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_across_partial_sends() {
        let body = pattern(4 * 1024 * 1024);
        let copy = FileCopy::new(&body).expect("a memory file");
        offer(&copy);
        let before = sent();
        let (mut writer, mut reader) = pair(true).await;
        let expected = body.clone();
        let write = async move {
            let mut rest = body;
            let mut writes = 0;
            while !rest.is_empty() {
                let n = writer.write(&rest).await.unwrap();
                let _ = rest.split_to(n);
                writes += 1;
            }
            writes
        };
        let read = async move {
            let mut got = Vec::new();
            let mut chunk = vec![0; 7_000];
            while got.len() < expected.len() {
                let n = reader.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&chunk[..n]);
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            got == expected
        };
        let (writes, same) = tokio::join!(write, read);
        assert!(
            writes > 1,
            "4 MiB went out in one send: nothing was partial"
        );
        assert!(same, "the bytes read differ from those written");
        assert!(sent() - before >= 4 * 1024 * 1024, "not sent from the file");
    }

    #[tokio::test]
    async fn bytes_that_were_not_offered_are_written_as_they_are() {
        let offered = pattern(100_000);
        let copy = FileCopy::new(&offered).expect("a memory file");
        offer(&copy);
        // Same content, other memory: written by copy, never from the file.
        let other = Bytes::from(offered.to_vec());
        let got = write_and_read(true, vec![other.clone()], other.to_vec()).await;
        assert_eq!(got, other.to_vec());
        assert_eq!(copy.offset_of(&other), None);
        assert_eq!(copy.offset_of(&offered[10..20]), Some(10));
        assert_eq!(copy.offset_of(&[]), None);
        // Off (HTTP/2): the offered bytes themselves go by copy.
        let got = write_and_read(false, vec![offered.clone()], offered.to_vec()).await;
        assert_eq!(got, offered.to_vec());
    }

    #[test]
    fn the_file_is_sealed() {
        let copy = FileCopy::new(&pattern(10)).expect("a memory file");
        let mut file = std::fs::File::from(copy.file.try_clone().unwrap());
        assert!(
            file.write_all(b"changed").is_err(),
            "a sealed file took a write"
        );
        assert!(file.set_len(1).is_err(), "a sealed file was cut");
    }
}
