//! Responses too large to hold in memory go to a temporary file, so that the
//! Gunicorn connection (and its sync worker) is free as soon as Gunicorn has
//! written the response, however slowly the client reads (nginx's
//! `proxy_temp_path` and `proxy_max_temp_file_size`). The file is unlinked
//! as soon as it is created: nothing is left behind, even after a crash.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt, ReadBuf};

/// Read from the file this much at a time.
const CHUNK: usize = 64 * 1024;

/// A temporary file being written.
pub struct Spool {
    file: tokio::fs::File,
    len: u64,
}

impl Spool {
    /// A new, already unlinked file in `dir`.
    pub async fn create(dir: &Path) -> io::Result<Spool> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "gatehouse-{}-{}-{:08x}.spool",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let path = dir.join(name);
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        tokio::fs::remove_file(&path).await?;
        Ok(Spool { file, len: 0 })
    }

    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data).await?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// The written bytes, to be read from the start.
    pub async fn into_reader(mut self) -> io::Result<SpoolReader> {
        self.file.flush().await?;
        self.file.seek(io::SeekFrom::Start(0)).await?;
        Ok(SpoolReader {
            file: self.file,
            remaining: self.len,
            buf: BytesMut::new(),
        })
    }
}

/// A spooled response body, read back in chunks.
pub struct SpoolReader {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
}

impl SpoolReader {
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next chunk; `None` at the end.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(self.remaining).unwrap_or(CHUNK).min(CHUNK);
        self.buf.resize(want, 0);
        let mut read = ReadBuf::new(&mut self.buf[..want]);
        match Pin::new(&mut self.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "spool file shorter than written",
                    ))));
                }
                self.remaining -= n as u64;
                Poll::Ready(Some(Ok(self.buf.split_to(n).freeze())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_bytes_read_back_and_the_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        spool.write(&data[..70_000]).await.unwrap();
        spool.write(&data[70_000..]).await.unwrap();
        assert_eq!(spool.written(), 200_000);
        let mut reader = spool.into_reader().await.unwrap();
        let mut back = Vec::new();
        while let Some(chunk) = std::future::poll_fn(|cx| reader.poll_chunk(cx)).await {
            back.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(back, data);
    }
}
