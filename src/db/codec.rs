//! PostgreSQL protocol 3.0 framing on `bytes`/`tokio-util`. The decoders cut
//! the stream into whole frames, keep each frame's exact bytes for
//! byte-for-byte forwarding, and decode only the fields pooling and routing
//! read (query text, statement names, transaction status, keys, errors). Input
//! from the network is never trusted: a bad length, an oversized message or
//! an unknown startup code is an error with the SQLSTATE to report, never a
//! panic and never a wait for bytes that will not come.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Protocol 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A startup packet is small; PostgreSQL itself allows 10,000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Message types by their tag byte. A letter means different messages in
/// each direction, so the constants are grouped by who sends them.
pub mod tag {
    /// Sent by clients.
    pub mod front {
        pub const QUERY: u8 = b'Q';
        pub const PARSE: u8 = b'P';
        pub const BIND: u8 = b'B';
        pub const DESCRIBE: u8 = b'D';
        pub const CLOSE: u8 = b'C';
        pub const EXECUTE: u8 = b'E';
        pub const SYNC: u8 = b'S';
        pub const FLUSH: u8 = b'H';
        pub const FUNCTION_CALL: u8 = b'F';
        pub const TERMINATE: u8 = b'X';
        /// PasswordMessage, SASLInitialResponse and SASLResponse.
        pub const PASSWORD: u8 = b'p';
        pub const COPY_DATA: u8 = b'd';
        pub const COPY_DONE: u8 = b'c';
        pub const COPY_FAIL: u8 = b'f';
    }

    /// Sent by servers.
    pub mod back {
        pub const AUTHENTICATION: u8 = b'R';
        pub const BACKEND_KEY_DATA: u8 = b'K';
        pub const PARAMETER_STATUS: u8 = b'S';
        pub const READY_FOR_QUERY: u8 = b'Z';
        pub const ERROR_RESPONSE: u8 = b'E';
        pub const NOTICE_RESPONSE: u8 = b'N';
        pub const NOTIFICATION_RESPONSE: u8 = b'A';
        pub const PARSE_COMPLETE: u8 = b'1';
        pub const BIND_COMPLETE: u8 = b'2';
        pub const CLOSE_COMPLETE: u8 = b'3';
        pub const COMMAND_COMPLETE: u8 = b'C';
        pub const ROW_DESCRIPTION: u8 = b'T';
        pub const DATA_ROW: u8 = b'D';
        pub const NO_DATA: u8 = b'n';
        pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
        pub const PORTAL_SUSPENDED: u8 = b's';
    }

    /// Fields of an ErrorResponse or NoticeResponse.
    pub mod field {
        pub const SEVERITY: u8 = b'S';
        /// The severity, never localised.
        pub const SEVERITY_NONLOCALIZED: u8 = b'V';
        pub const SQLSTATE: u8 = b'C';
        pub const MESSAGE: u8 = b'M';
    }

    /// What a Describe or Close names.
    pub const STATEMENT: u8 = b'S';
    pub const PORTAL: u8 = b'P';
}

/// The transaction status a ReadyForQuery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block; only ROLLBACK is accepted.
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InBlock),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InBlock => b'T',
            Self::Failed => b'E',
        }
    }
}

/// Why a stream could not be decoded (`DbError` says what the client is told).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported startup code {0}")]
    UnknownStartupCode(i32),
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("i/o: {0}")]
    Io(String),
}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> Self {
        CodecError::Io(e.to_string())
    }
}

/// What a client sends before it is a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Protocol 3.x with its parameters (`user`, `database`, `options`, ...).
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// A typed message: its tag and its whole frame (tag, length, body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The body after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Decodes the untyped startup packets: length, code, payload.
#[derive(Debug, Default)]
pub struct StartupCodec;

impl Decoder for StartupCodec {
    type Item = Startup;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Startup>, CodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
            return Err(if len > MAX_STARTUP_PACKET as i32 {
                CodecError::TooLarge {
                    len: len as usize,
                    max: MAX_STARTUP_PACKET,
                }
            } else {
                CodecError::BadLength(i64::from(len))
            });
        }
        let len = len as usize;
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        let mut packet = src.split_to(len).freeze();
        packet.advance(4);
        let code = packet.get_i32();
        let startup = match code {
            SSL_REQUEST if packet.is_empty() => Startup::SslRequest,
            GSSENC_REQUEST if packet.is_empty() => Startup::GssEncRequest,
            CANCEL_REQUEST if packet.len() == 8 => Startup::Cancel {
                process_id: packet.get_i32(),
                secret_key: packet.get_i32(),
            },
            SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
                return Err(CodecError::Malformed { what: "startup" });
            }
            code if code >> 16 == 3 => Startup::Startup {
                minor: (code & 0xffff) as u16,
                params: startup_params(&packet)?,
            },
            other => return Err(CodecError::UnknownStartupCode(other)),
        };
        Ok(Some(startup))
    }
}

/// `name\0value\0 ... \0`
fn startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let malformed = CodecError::Malformed { what: "startup" };
    let mut params = Vec::new();
    loop {
        let (name, rest) = cstr(body).ok_or_else(|| malformed.clone())?;
        if name.is_empty() {
            return if rest.is_empty() {
                Ok(params)
            } else {
                Err(malformed)
            };
        }
        let (value, rest) = cstr(rest).ok_or_else(|| malformed.clone())?;
        params.push((name.to_string(), value.to_string()));
        body = rest;
    }
}

/// A NUL-terminated UTF-8 string and what follows it.
pub fn cstr(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (raw, rest) = cbytes(bytes)?;
    Some((std::str::from_utf8(raw).ok()?, rest))
}

/// A NUL-terminated byte string and what follows it. Query text and names
/// stay bytes: a client may use an encoding other than UTF-8.
pub fn cbytes(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, bytes)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

/// Cuts typed messages (tag, length, body) out of a stream, either direction.
#[derive(Debug)]
pub struct FrameCodec {
    max_message_size: usize,
}

impl FrameCodec {
    pub fn new(max_message_size: usize) -> Self {
        FrameCodec { max_message_size }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(total) = complete_frame(src, self.max_message_size)? else {
            // Room for the rest of the frame.
            if let Some(len) = announced_len(src) {
                src.reserve(len.saturating_sub(src.len()));
            }
            return Ok(None);
        };
        let bytes = src.split_to(total).freeze();
        Ok(Some(Frame {
            tag: bytes[0],
            bytes,
        }))
    }
}

/// The length a frame at the start of `src` announces (tag, length, body),
/// once its header has arrived.
pub fn announced_len(src: &[u8]) -> Option<usize> {
    (src.len() >= 5)
        .then(|| i32::from_be_bytes([src[1], src[2], src[3], src[4]]).max(4) as usize + 1)
}

/// The length of the whole frame at the start of `src` (tag, length, body)
/// once all of it has arrived; an error for a bad or oversized length.
pub fn complete_frame(src: &[u8], max_message_size: usize) -> Result<Option<usize>, CodecError> {
    if src.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
    if len < 4 {
        return Err(CodecError::BadLength(i64::from(len)));
    }
    let total = len as usize + 1;
    if total > max_message_size {
        return Err(CodecError::TooLarge {
            len: total,
            max: max_message_size,
        });
    }
    Ok((src.len() >= total).then_some(total))
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame.bytes);
        Ok(())
    }
}

/// Append a message made of `parts` to `out`.
pub fn put_frame(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_i32((len + 4) as i32);
    for part in parts {
        out.put_slice(part);
    }
}

/// ParseComplete, as bytes.
pub const PARSE_COMPLETE: &[u8] = &[tag::back::PARSE_COMPLETE, 0, 0, 0, 4];
/// CloseComplete, as bytes.
pub const CLOSE_COMPLETE: &[u8] = &[tag::back::CLOSE_COMPLETE, 0, 0, 0, 4];

/// ReadyForQuery with `status`.
pub fn ready_for_query(status: TransactionStatus) -> [u8; 6] {
    [tag::back::READY_FOR_QUERY, 0, 0, 0, 5, status.byte()]
}

/// An Authentication request: `code` (0 ok, 5 md5, 10 SASL, 11 SASL
/// continue, 12 SASL final) and what follows it.
pub fn authentication(code: i32, extra: &[u8]) -> Frame {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    frame(tag::back::AUTHENTICATION, &body)
}

/// BackendKeyData: the process id and secret a client cancels with.
pub fn backend_key_data(process_id: i32, secret_key: i32) -> Frame {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&process_id.to_be_bytes());
    body[4..].copy_from_slice(&secret_key.to_be_bytes());
    frame(tag::back::BACKEND_KEY_DATA, &body)
}

/// CommandComplete with its command tag (`DEALLOCATE`, ...).
pub fn command_complete(command: &str) -> Frame {
    let mut body = command.as_bytes().to_vec();
    body.push(0);
    frame(tag::back::COMMAND_COMPLETE, &body)
}

/// Build a frame from a tag and a body.
pub fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut bytes = BytesMut::with_capacity(body.len() + 5);
    bytes.put_u8(tag);
    bytes.put_i32((body.len() + 4) as i32);
    bytes.put_slice(body);
    Frame {
        tag,
        bytes: bytes.freeze(),
    }
}

/// What routing and pooling read from a client's messages. Text stays bytes
/// (`std::str::from_utf8` when UTF-8 is needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// Simple query.
    Query {
        sql: &'a [u8],
    },
    Parse {
        statement: &'a [u8],
        sql: &'a [u8],
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
    },
    Describe {
        kind: u8,
        name: &'a [u8],
    },
    Close {
        kind: u8,
        name: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
    },
    Sync,
    Flush,
    Terminate,
    CopyData,
    CopyDone,
    CopyFail,
    /// Anything else (auth responses, function calls): forwarded as it is.
    Other(u8),
}

impl Frame {
    pub fn frontend(&self) -> Result<Frontend<'_>, CodecError> {
        let body = self.body();
        let bad = |what| CodecError::Malformed { what };
        use tag::front;
        Ok(match self.tag {
            front::QUERY => Frontend::Query {
                sql: cbytes(body).ok_or(bad("Query"))?.0,
            },
            front::PARSE => {
                let (statement, rest) = cbytes(body).ok_or(bad("Parse"))?;
                let (sql, _) = cbytes(rest).ok_or(bad("Parse"))?;
                Frontend::Parse { statement, sql }
            }
            front::BIND => {
                let (portal, rest) = cbytes(body).ok_or(bad("Bind"))?;
                let (statement, _) = cbytes(rest).ok_or(bad("Bind"))?;
                Frontend::Bind { portal, statement }
            }
            front::DESCRIBE | front::CLOSE => {
                let (&kind, rest) = body.split_first().ok_or(bad("Describe/Close"))?;
                if kind != tag::STATEMENT && kind != tag::PORTAL {
                    return Err(bad("Describe/Close"));
                }
                let name = cbytes(rest).ok_or(bad("Describe/Close"))?.0;
                if self.tag == front::DESCRIBE {
                    Frontend::Describe { kind, name }
                } else {
                    Frontend::Close { kind, name }
                }
            }
            front::EXECUTE => Frontend::Execute {
                portal: cbytes(body).ok_or(bad("Execute"))?.0,
            },
            front::SYNC => Frontend::Sync,
            front::FLUSH => Frontend::Flush,
            front::TERMINATE => Frontend::Terminate,
            front::COPY_DATA => Frontend::CopyData,
            front::COPY_DONE => Frontend::CopyDone,
            front::COPY_FAIL => Frontend::CopyFail,
            other => Frontend::Other(other),
        })
    }

    /// The transaction status of a ReadyForQuery (`I`, `T` or `E`).
    pub fn ready_status(&self) -> Option<u8> {
        (self.tag == tag::back::READY_FOR_QUERY && self.body().len() == 1).then(|| self.body()[0])
    }

    /// The fields of an ErrorResponse or NoticeResponse, by code.
    pub fn error_fields(&self) -> Vec<(u8, &str)> {
        let mut fields = Vec::new();
        if self.tag != tag::back::ERROR_RESPONSE && self.tag != tag::back::NOTICE_RESPONSE {
            return fields;
        }
        let mut rest = self.body();
        while let Some((&code, after)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let Some((value, next)) = cstr(after) else {
                break;
            };
            fields.push((code, value));
            rest = next;
        }
        fields
    }
}

/// An ErrorResponse as PostgreSQL sends it: severity, SQLSTATE, message.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> Frame {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (code, value) in [
        (tag::field::SEVERITY, severity),
        (tag::field::SEVERITY_NONLOCALIZED, severity),
        (tag::field::SQLSTATE, sqlstate),
        (tag::field::MESSAGE, message),
    ] {
        body.push(code);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    frame(tag::back::ERROR_RESPONSE, &body)
}

/// A ParameterStatus: a setting the server reports, and its value.
pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    frame(tag::back::PARAMETER_STATUS, &body)
}

/// The name and value of a whole ParameterStatus frame (tag included).
pub fn read_parameter_status(frame: &[u8]) -> Option<(&str, &str)> {
    let body = frame.get(5..)?;
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((name, value))
}

#[cfg(test)]
mod tests;
