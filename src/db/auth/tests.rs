use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::*;

/// Run a whole exchange with postgres-protocol's client (what tokio-postgres
/// uses) on one side and ours on the other.
fn exchange(verifier: &ScramVerifier, password: &str) -> Result<(), AuthError> {
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let (server, server_first) = ScramExchange::start(verifier, client.message())?;
    client
        .update(server_first.as_bytes())
        .map_err(|_| AuthError::Malformed("client refused server-first"))?;
    let server_final = server.finish(client.message())?;
    // The client checks the server's signature: we really hold the verifier.
    client
        .finish(server_final.as_bytes())
        .map_err(|_| AuthError::Malformed("client refused the server signature"))
}

#[test]
fn right_password_passes_and_the_client_accepts_the_server() {
    let verifier = ScramVerifier::from_password("s3cret", b"0123456789abcdef", SCRAM_ITERATIONS);
    assert_eq!(exchange(&verifier, "s3cret"), Ok(()));
}

#[test]
fn wrong_password_fails_with_28p01() {
    let verifier = ScramVerifier::from_password("s3cret", b"salt", 4096);
    let error = exchange(&verifier, "guess").unwrap_err();
    assert!(matches!(error, AuthError::Failed(_)), "{error:?}");
    assert_eq!(
        crate::db::error::DbError::from(error.clone()).sqlstate(),
        "28P01"
    );
}

#[test]
fn verifiers_in_postgres_format_are_read() {
    // What postgres-protocol (and so PostgreSQL's own format) produces.
    let stored = postgres_protocol::password::scram_sha_256(b"pa ss");
    let verifier = ScramVerifier::parse(&stored).expect("parses");
    assert_eq!(verifier.iterations, 4096);
    assert_eq!(exchange(&verifier, "pa ss"), Ok(()));
    assert!(ScramVerifier::parse("md5abc").is_none());
    assert!(ScramVerifier::parse("SCRAM-SHA-256$0:c2FsdA==$AA==:AA==").is_none());
}

#[test]
fn malformed_messages_are_refused() {
    let verifier = ScramVerifier::from_password("x", b"salt", 4096);
    for first in [
        &b"garbage"[..],
        b"n,,",
        b"n,,n=,",
        b"x,,n=,r=abc",
        b"\xff\xfe",
    ] {
        assert!(matches!(
            ScramExchange::start(&verifier, first),
            Err(AuthError::Malformed(_))
        ));
    }
    assert_eq!(
        ScramExchange::start(&verifier, b"p=tls-server-end-point,,n=,r=abc").unwrap_err(),
        AuthError::ChannelBinding
    );
    let (server, _) = ScramExchange::start(&verifier, b"n,,n=,r=abc").unwrap();
    assert!(matches!(
        server.finish(b"c=biws,r=wrong-nonce,p=AAAA"),
        Err(AuthError::Malformed(_))
    ));
}

#[test]
fn md5_matches_the_postgres_client() {
    let stored = md5_secret("s3cret", "app");
    assert_eq!(stored, postgres_protocol::password::md5(b"s3cret", "app"));
    let salt = [1, 2, 3, 4];
    let response = postgres_protocol::authentication::md5_hash(b"app", b"s3cret", salt);
    assert!(md5_response_ok(&stored, salt, response.as_bytes()));
    let wrong = postgres_protocol::authentication::md5_hash(b"app", b"guess", salt);
    assert!(!md5_response_ok(&stored, salt, wrong.as_bytes()));
}
