//! Client authentication, server side: SCRAM-SHA-256 (RFC 5802, RFC 7677, as
//! PostgreSQL speaks it) and md5, against a secret given in clear or as the
//! verifier PostgreSQL stores in `pg_authid.rolpassword`. PgCat has no
//! client-side SCRAM (pgcat #255); Django's psycopg clients use it by default.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL's default iteration count for new verifiers.
pub const SCRAM_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Wrong password, or a peer not trusted: the client sees 28P01 and
    /// nothing more; the reason is for the server's log.
    #[error("password authentication failed")]
    Failed(&'static str),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
}

/// What PostgreSQL keeps for a SCRAM-SHA-256 password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// RFC 5802 `Hi`: PBKDF2 with HMAC-SHA-256, one block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

impl ScramVerifier {
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        // PostgreSQL applies SASLprep and falls back to the raw bytes when the
        // password is not valid for it; plain ASCII passwords are unchanged.
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_string());
        let salted = hi(prepared.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, the form
    /// of `pg_authid.rolpassword`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramVerifier {
            iterations: iterations.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// One SCRAM exchange after the server sent its first message.
#[derive(Debug)]
pub struct ScramExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

/// `key=value` attribute of a SCRAM message.
fn attribute(part: &str, key: char) -> Option<&str> {
    part.strip_prefix(key)?.strip_prefix('=')
}

impl ScramExchange {
    /// Read the client's first message; return the exchange and the
    /// server-first message to send (in AuthenticationSASLContinue).
    pub fn start(
        verifier: &ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, String), AuthError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        // gs2-header: "n,," (no binding), "y,," (client could bind), or "p=..." (binding).
        let mut parts = text.splitn(3, ',');
        let flag = parts.next().ok_or(AuthError::Malformed("no gs2 header"))?;
        let authzid = parts.next().ok_or(AuthError::Malformed("no gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(AuthError::Malformed("no client-first-bare"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(AuthError::ChannelBinding),
            _ => return Err(AuthError::Malformed("bad gs2 flag")),
        }
        if !authzid.is_empty() {
            return Err(AuthError::Malformed("authzid is not supported"));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|p| attribute(p, 'r'))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Malformed("no client nonce"))?;
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = ScramExchange {
            verifier: verifier.clone(),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: format!("{flag},{authzid},"),
        };
        Ok((exchange, server_first))
    }

    /// Check the client's proof; return the server-final message (for
    /// AuthenticationSASLFinal) when it is right.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(AuthError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for part in without_proof.split(',') {
            if let Some(c) = attribute(part, 'c') {
                channel = Some(c);
            } else if let Some(r) = attribute(part, 'r') {
                nonce = Some(r);
            }
        }
        if channel != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(AuthError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(AuthError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(AuthError::Failed("wrong password (SCRAM proof)"));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `md5` + hex(md5(password + user)), what `pg_authid` stores for md5.
pub fn md5_secret(password: &str, user: &str) -> String {
    let inner = <md5::Md5 as md5::Digest>::digest([password.as_bytes(), user.as_bytes()].concat());
    format!("md5{}", hex::encode(inner))
}

/// Check an md5 PasswordMessage (`md5` + hex(md5(secret-hex + salt))) against
/// the stored secret (`md5…`).
pub fn md5_response_ok(stored_secret: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let Some(hex_secret) = stored_secret.strip_prefix("md5") else {
        return false;
    };
    let expected = <md5::Md5 as md5::Digest>::digest([hex_secret.as_bytes(), &salt].concat());
    let expected = format!("md5{}", hex::encode(expected));
    // The message body is the string and its NUL.
    let response = response.strip_suffix(b"\0").unwrap_or(response);
    constant_time_eq(expected.as_bytes(), response)
}

#[cfg(test)]
mod tests;
