//! Connections to PostgreSQL: open (TCP or Unix socket), log in as a
//! configured user (SCRAM-SHA-256 through postgres-protocol's client, md5,
//! cleartext or trust), and keep what the server announced: its parameters and
//! its cancel key.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::codec::Decoder;

use super::codec::{CodecError, Frame, FrameCodec, read_parameter_status};
use crate::config::db::Node;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connecting to {node}: {source}")]
    Connect { node: String, source: io::Error },
    #[error("connecting to {0}: timed out")]
    Timeout(String),
    #[error("i/o with the server: {0}")]
    Io(#[from] io::Error),
    #[error("server protocol: {0}")]
    Codec(#[from] CodecError),
    /// The server refused us; its SQLSTATE and message are passed on.
    #[error("server: {message} ({sqlstate})")]
    Refused { sqlstate: String, message: String },
    #[error("the server wants a password for `{0}` and none is configured")]
    NoPassword(String),
    #[error("the server asked for an unsupported authentication ({0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM with the server: {0}")]
    Scram(String),
}

/// A Unix or TCP stream to a server.
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Open a stream to a node (no login).
pub async fn reach(node: &Node) -> io::Result<ServerStream> {
    Ok(match node {
        Node::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            let _ = stream.set_nodelay(true);
            ServerStream::Tcp(stream)
        }
        Node::Socket { dir, port } => {
            ServerStream::Unix(UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?)
        }
    })
}

/// Who to log in as, and to which database.
pub struct Login<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub password: Option<&'a str>,
    /// Extra startup parameters (application_name, options, ...).
    pub params: &'a [(String, String)],
}

/// A logged-in server connection, ready for a query.
pub struct ServerConn {
    pub stream: ServerStream,
    /// Bytes read from the server but not yet consumed.
    pub buf: BytesMut,
    codec: FrameCodec,
    /// ParameterStatus values as the server last reported them.
    pub params: Vec<(String, String)>,
    /// The values reported at login, to go back to for a client that sets none.
    pub defaults: Vec<(String, String)>,
    /// Settings the server reported while relaying, for the client to
    /// track; taken by `Checkout::take_reports`.
    pub reports: Vec<(String, String)>,
    /// Settings applied with SET for the current client, cleared by a reset.
    pub applied: Vec<(String, String)>,
    /// The server's BackendKeyData (process id, secret key), for cancels.
    pub backend_key: (i32, i32),
    /// For `pool.max_lifetime`.
    pub opened: std::time::Instant,
    /// For `pool.idle_timeout`: when it last went back to its pool.
    pub idle_since: std::time::Instant,
    /// Statements prepared for transaction-pooled clients.
    pub statements: super::statements::ServerStatements,
    /// The node it is connected to.
    pub node: std::sync::Arc<Node>,
    /// What the messages sent still wait for, and the transaction status.
    pub exchange: super::statements::Exchange,
    /// The client settings this session was last set up for, with the
    /// statement timeout then configured; cleared by a reset.
    pub settled: Option<(std::sync::Arc<super::settings::Settings>, Duration)>,
    /// Reused for the bytes sent to the server.
    pub out: BytesMut,
}

impl ServerConn {
    pub async fn open(
        node: &Node,
        login: &Login<'_>,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        let stream = tokio::time::timeout(timeout, reach(node))
            .await
            .map_err(|_| ServerError::Timeout(node.to_string()))?
            .map_err(|source| ServerError::Connect {
                node: node.to_string(),
                source,
            })?;
        let mut conn = ServerConn {
            stream,
            buf: BytesMut::with_capacity(8192),
            codec: FrameCodec::new(1 << 30),
            params: Vec::new(),
            defaults: Vec::new(),
            reports: Vec::new(),
            applied: Vec::new(),
            backend_key: (0, 0),
            opened: std::time::Instant::now(),
            idle_since: std::time::Instant::now(),
            statements: Default::default(),
            node: std::sync::Arc::new(node.clone()),
            exchange: Default::default(),
            settled: None,
            out: BytesMut::new(),
        };
        tokio::time::timeout(timeout, conn.login(login))
            .await
            .map_err(|_| ServerError::Timeout(node.to_string()))??;
        Ok(conn)
    }

    /// Whether an idle connection is still usable: nothing to read (an idle
    /// server sends nothing) and not closed. A server that shut down sends a
    /// FATAL and closes; either shows up here.
    pub fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        let read = match &self.stream {
            ServerStream::Tcp(s) => s.try_read(&mut probe),
            ServerStream::Unix(s) => s.try_read(&mut probe),
        };
        matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock) && self.buf.is_empty()
    }

    /// The next whole frame from the server.
    pub async fn read_frame(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ServerError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    async fn login(&mut self, login: &Login<'_>) -> Result<(), ServerError> {
        let mut params: Vec<(&str, &str)> =
            vec![("user", login.user), ("database", login.database)];
        params.extend(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut out = BytesMut::new();
        frontend::startup_message(params, &mut out)?;
        self.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => self.authenticate(&frame, login, &mut scram).await?,
                b'S' => {
                    note_parameter(&mut self.params, &frame.bytes);
                }
                b'K' => {
                    let mut body = frame.body();
                    if body.len() == 8 {
                        self.backend_key = (body.get_i32(), body.get_i32());
                    }
                }
                b'Z' => {
                    self.defaults = self.params.clone();
                    return Ok(());
                }
                b'E' => return Err(refused(&frame)),
                // NoticeResponse and anything else announced at login.
                _ => {}
            }
        }
    }

    async fn authenticate(
        &mut self,
        frame: &Frame,
        login: &Login<'_>,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), ServerError> {
        let mut body = frame.body();
        if body.len() < 4 {
            return Err(CodecError::Malformed {
                what: "Authentication",
            }
            .into());
        }
        let code = body.get_i32();
        let password = || {
            login
                .password
                .ok_or_else(|| ServerError::NoPassword(login.user.to_string()))
        };
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(password()?.as_bytes(), &mut out)?,
            5 if body.len() == 4 => {
                let salt = [body[0], body[1], body[2], body[3]];
                let hash = postgres_protocol::authentication::md5_hash(
                    login.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let offers_scram = body
                    .split(|b| *b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(ServerError::UnsupportedAuth(code));
                }
                let client =
                    ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out)?;
                *scram = Some(client);
            }
            11 => {
                let client = scram.as_mut().ok_or(ServerError::UnsupportedAuth(code))?;
                client
                    .update(body)
                    .map_err(|e| ServerError::Scram(e.to_string()))?;
                frontend::sasl_response(client.message(), &mut out)?;
            }
            12 => {
                let client = scram.as_mut().ok_or(ServerError::UnsupportedAuth(code))?;
                // Verifies the server's signature: it really knows the password.
                client
                    .finish(body)
                    .map_err(|e| ServerError::Scram(e.to_string()))?;
                return Ok(());
            }
            other => return Err(ServerError::UnsupportedAuth(other)),
        }
        self.send(&out).await
    }
}

/// A ParameterStatus frame from the server, kept in `params`: the name and
/// value when the value is new.
pub fn note_parameter<'f>(
    params: &mut Vec<(String, String)>,
    frame: &'f [u8],
) -> Option<(&'f str, &'f str)> {
    let (name, value) = read_parameter_status(frame)?;
    if super::settings::lookup(params, name) == Some(value) {
        return None;
    }
    super::settings::upsert(params, name, value);
    Some((name, value))
}

/// The SQLSTATE and message of an ErrorResponse from the server.
pub fn refused(frame: &Frame) -> ServerError {
    let fields = frame.error_fields();
    let field = |code: u8| {
        fields
            .iter()
            .find(|(c, _)| *c == code)
            .map_or_else(String::new, |(_, v)| (*v).to_string())
    };
    ServerError::Refused {
        sqlstate: field(b'C'),
        message: field(b'M'),
    }
}
