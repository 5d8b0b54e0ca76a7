//! Bytes from a client or a server: the startup decoder, the frame decoder
//! and the message fields must answer with a value or an error, never panic.
#![no_main]

use bytes::BytesMut;
use gatehouse::db::codec::{FrameCodec, StartupCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = StartupCodec.decode(&mut BytesMut::from(data));
    let mut buf = BytesMut::from(data);
    let mut codec = FrameCodec::new(1 << 16);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = frame.frontend();
        let _ = frame.ready_status();
        let _ = frame.error_fields();
    }
});
