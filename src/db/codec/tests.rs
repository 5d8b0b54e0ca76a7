use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use super::*;

fn startup_bytes(code: i32, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 8) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn decode_startup(bytes: &[u8]) -> Result<Option<Startup>, CodecError> {
    StartupCodec.decode(&mut BytesMut::from(bytes))
}

#[test]
fn startup_parameters_are_read() {
    let packet = startup_bytes(
        PROTOCOL_3_0,
        b"user\0app\0database\0muejam\0options\0-c statement_timeout=30000\0\0",
    );
    let startup = decode_startup(&packet).unwrap().unwrap();
    assert_eq!(startup.param("user"), Some("app"));
    assert_eq!(startup.param("database"), Some("muejam"));
    assert_eq!(startup.param("options"), Some("-c statement_timeout=30000"));
    assert_eq!(
        decode_startup(&packet[..10]),
        Ok(None),
        "waits for the rest"
    );
}

#[test]
fn special_startup_codes() {
    assert_eq!(
        decode_startup(&startup_bytes(SSL_REQUEST, b"")),
        Ok(Some(Startup::SslRequest))
    );
    assert_eq!(
        decode_startup(&startup_bytes(GSSENC_REQUEST, b"")),
        Ok(Some(Startup::GssEncRequest))
    );
    let mut cancel = 42i32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&7i32.to_be_bytes());
    assert_eq!(
        decode_startup(&startup_bytes(CANCEL_REQUEST, &cancel)),
        Ok(Some(Startup::Cancel {
            process_id: 42,
            secret_key: 7
        }))
    );
}

#[test]
fn bad_startup_packets_are_errors_with_sqlstates() {
    let unknown = decode_startup(&startup_bytes(0x0002_0000, b"")).unwrap_err();
    assert_eq!(unknown, CodecError::UnknownStartupCode(0x0002_0000));
    assert_eq!(
        crate::db::error::DbError::from(unknown.clone()).sqlstate(),
        "08P01"
    );
    assert_eq!(
        decode_startup(&[0, 0, 0, 3, 0, 0, 0, 0]),
        Err(CodecError::BadLength(3))
    );
    let huge = decode_startup(&[0, 1, 0, 0]).unwrap_err();
    assert_eq!(
        crate::db::error::DbError::from(huge.clone()).sqlstate(),
        "54000"
    );
    // A parameter without its value, and garbage after the terminator.
    assert!(decode_startup(&startup_bytes(PROTOCOL_3_0, b"user\0")).is_err());
    assert!(decode_startup(&startup_bytes(PROTOCOL_3_0, b"user\0a\0\0x")).is_err());
    assert!(decode_startup(&startup_bytes(CANCEL_REQUEST, b"1234")).is_err());
}

#[test]
fn frames_decode_what_routing_needs() {
    let parse = frame(b'P', b"s1\0SELECT $1\0\0\0");
    assert_eq!(
        parse.frontend(),
        Ok(Frontend::Parse {
            statement: b"s1",
            sql: b"SELECT $1"
        })
    );
    let bind = frame(b'B', b"\0s1\0\0\0\0\0\0\0");
    assert_eq!(
        bind.frontend(),
        Ok(Frontend::Bind {
            portal: b"",
            statement: b"s1"
        })
    );
    // Query text in another encoding stays bytes.
    let latin1 = frame(b'Q', b"SELECT '\xe9t\xe9'\0");
    assert_eq!(
        latin1.frontend(),
        Ok(Frontend::Query {
            sql: b"SELECT '\xe9t\xe9'"
        })
    );
    assert!(frame(b'Q', b"no terminator").frontend().is_err());
    assert!(frame(b'C', b"X\0").frontend().is_err());
    assert_eq!(frame(b'Z', b"T").ready_status(), Some(b'T'));
    assert_eq!(frame(b'Z', b"").ready_status(), None);
}

#[test]
fn error_response_round_trips() {
    let error = error_response(
        "FATAL",
        "28P01",
        "password authentication failed for user \"app\"",
    );
    assert_eq!(error.tag, b'E');
    let fields = error.error_fields();
    assert!(fields.contains(&(b'C', "28P01")));
    assert!(fields.contains(&(b'S', "FATAL")));
    let mut buf = BytesMut::from(&error.bytes[..]);
    assert_eq!(FrameCodec::new(1 << 20).decode(&mut buf), Ok(Some(error)));
}

#[test]
fn frame_lengths_are_checked() {
    let mut codec = FrameCodec::new(64);
    assert_eq!(
        codec.decode(&mut BytesMut::from(&b"Q\0\0\0\x02"[..])),
        Err(CodecError::BadLength(2))
    );
    assert_eq!(
        crate::db::error::DbError::from(
            codec
                .decode(&mut BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]))
                .unwrap_err()
        )
        .sqlstate(),
        "54000"
    );
    assert_eq!(
        codec.decode(&mut BytesMut::from(&b"Q\0\0\0\x09SEL"[..])),
        Ok(None)
    );
}

proptest! {
    /// Any sequence of frames, cut into any reads, decodes to the same frames
    /// with the same bytes.
    #[test]
    fn frames_survive_any_split(
        messages in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let frames: Vec<Frame> = messages.iter().map(|(tag, body)| frame(*tag, body)).collect();
        let stream: Vec<u8> = frames.iter().flat_map(|f| f.bytes.to_vec()).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            buf.extend_from_slice(&stream[start..cut]);
            start = cut;
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes give frames or an error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_startup(&bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::new(4096);
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            let _ = f.frontend();
            let _ = f.error_fields();
        }
    }
}
