//! Response bodies the gateway sends: whole (buffered from Gunicorn, made by
//! the gateway, or stored, offered to the writer from its memory file), a
//! buffered head followed by the rest streamed, or spooled to a file.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::spool::SpoolReader;
use super::upstream::h1::UpstreamBody;
use crate::net::FileCopy;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub enum ProxyBody {
    /// The whole body; `None` once sent.
    Full(Option<Bytes>),
    /// A response larger than the buffer: what was read, then the rest.
    /// Boxed, as below: every response, and every request's future, is as
    /// large as the largest variant, and the common one is `Full`.
    Streaming {
        head: Option<Bytes>,
        rest: Box<UpstreamBody>,
    },
    /// A stored body that is also in a memory file: offered to the
    /// connection's writer, which sends it from the file without a copy.
    Stored {
        data: Option<Bytes>,
        copy: Arc<FileCopy>,
    },
    /// A response larger than the buffer, read whole into a temporary file;
    /// past `max_temp_file_size`, the rest still streams from Gunicorn.
    Spooled {
        file: Box<SpoolReader>,
        rest: Option<Box<UpstreamBody>>,
    },
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// A stored body, from its memory file when it has one.
    pub fn stored(body: &Bytes, copy: Option<&Arc<FileCopy>>) -> Self {
        match copy {
            Some(copy) if !body.is_empty() => ProxyBody::Stored {
                data: Some(body.clone()),
                copy: Arc::clone(copy),
            },
            _ => ProxyBody::full(body.clone()),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    /// What was read (`head`, possibly nothing), then the rest from Gunicorn.
    pub fn streaming(head: Bytes, rest: UpstreamBody) -> Self {
        ProxyBody::Streaming {
            head: (!head.is_empty()).then_some(head),
            rest: Box::new(rest),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Stored { data, copy } => Poll::Ready(data.take().map(|d| {
                crate::net::offer(copy);
                Ok(Frame::data(d))
            })),
            ProxyBody::Streaming { head, rest } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                Pin::new(rest).poll_frame(cx)
            }
            ProxyBody::Spooled { file, rest } => match file.poll_chunk(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                Poll::Ready(Some(Err(e))) => {
                    // The client gets a cut body, and the connection closes.
                    tracing::error!(error = %e, "reading a spooled response");
                    *rest = None;
                    Poll::Ready(None)
                }
                Poll::Ready(None) => match rest {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(data) | ProxyBody::Stored { data, .. } => data.is_none(),
            ProxyBody::Streaming { head, rest } => head.is_none() && rest.is_end_stream(),
            ProxyBody::Spooled { file, rest } => {
                file.remaining() == 0 && rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(data) | ProxyBody::Stored { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Streaming { head, rest } => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            ProxyBody::Spooled { file, rest } => match rest {
                None => SizeHint::with_exact(file.remaining()),
                Some(rest) => {
                    let inner = rest.size_hint();
                    let mut hint = SizeHint::new();
                    hint.set_lower(inner.lower() + file.remaining());
                    if let Some(upper) = inner.upper() {
                        hint.set_upper(upper + file.remaining());
                    }
                    hint
                }
            },
        }
    }
}
