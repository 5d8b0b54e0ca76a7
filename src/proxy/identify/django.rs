//! Django's view of a session cookie: which value Django reads when a name
//! repeats (`django.http.cookie.parse_cookie`), and the signature of the
//! `signed_cookies` session backend (`django.core.signing`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// The salt the `signed_cookies` backend signs with.
const SIGNED_COOKIES_SALT: &str = "django.contrib.sessions.backends.signed_cookies";

/// The value Django reads for cookie `name`: every `Cookie` field decoded
/// as UTF-8 with replacement (Django's `get_str_from_wsgi`), split on `;`;
/// a chunk without `=` has an empty name; names and values stripped of
/// Unicode whitespace (Python's `str.strip`); the last occurrence wins; a
/// quoted value is unquoted. The gateway joins repeated `Cookie` fields with
/// `; ` before forwarding, so this reads them in the order Django will. An
/// empty value is no cookie.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    let mut found: Option<String> = None;
    for field in headers.get_all(header::COOKIE) {
        let text = String::from_utf8_lossy(field.as_bytes());
        for chunk in text.split(';') {
            let (key, value) = chunk.split_once('=').unwrap_or(("", chunk));
            if key.trim() == name {
                found = Some(value.trim().to_string());
            }
        }
    }
    found
        .filter(|v| !v.is_empty())
        .map(|v| unquote(v.as_bytes()))
}

/// `http.cookies._unquote`: a value in double quotes loses them, and its
/// `\ooo` octal and `\c` escapes are resolved.
fn unquote(value: &[u8]) -> Vec<u8> {
    let inner = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => return value.to_vec(),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        if inner[i] == b'\\' && i + 1 < inner.len() {
            let octal = inner.get(i + 1..i + 4).filter(|d| {
                d.iter().all(|b| (b'0'..=b'7').contains(b)) && (b'0'..=b'3').contains(&d[0])
            });
            if let Some(digits) = octal {
                out.push(digits.iter().fold(0u8, |n, d| n * 8 + (d - b'0')));
                i += 4;
            } else {
                out.push(inner[i + 1]);
                i += 2;
            }
        } else {
            out.push(inner[i]);
            i += 1;
        }
    }
    out
}

/// Check a `signed_cookies` session cookie (`payload:timestamp:signature`,
/// Django's `TimestampSigner` with the backend's salt) against each key, and
/// its age against `max_age`. Returns the signed payload when it holds.
pub fn verify_signed<'a>(
    value: &'a [u8],
    secret_keys: &[Vec<u8>],
    max_age_secs: u64,
    now_secs: u64,
) -> Option<&'a [u8]> {
    let text = std::str::from_utf8(value).ok()?;
    let (signed, signature) = text.rsplit_once(':')?;
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let valid = secret_keys.iter().any(|secret| {
        // django.utils.crypto.salted_hmac: key = sha256(salt + "signer" + secret).
        let mut derive = Sha256::new();
        derive.update(SIGNED_COOKIES_SALT.as_bytes());
        derive.update(b"signer");
        derive.update(secret);
        let key = derive.finalize();
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else {
            return false;
        };
        mac.update(signed.as_bytes());
        // Constant time.
        mac.verify_slice(&signature).is_ok()
    });
    if !valid {
        return None;
    }
    let (payload, timestamp) = signed.rsplit_once(':')?;
    let signed_at = b62_decode(timestamp)?;
    let age = i128::from(now_secs) - i128::from(signed_at);
    (age <= i128::from(max_age_secs)).then_some(payload.as_bytes())
}

/// `django.core.signing.b62_decode`.
fn b62_decode(text: &str) -> Option<i64> {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for c in digits.bytes() {
        let d = DIGITS.iter().position(|x| *x == c)?;
        n = n.checked_mul(62)?.checked_add(i64::try_from(d).ok()?)?;
    }
    Some(sign * n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::COOKIE, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_last_value_wins_as_in_django() {
        let pick = |values: &[&str]| cookie(&headers(values), "sessionid");
        assert_eq!(pick(&["sessionid=a; sessionid=b"]), Some(b"b".to_vec()));
        assert_eq!(
            pick(&["sessionid=a", "x=1; sessionid=b"]),
            Some(b"b".to_vec())
        );
        assert_eq!(pick(&[" sessionid = a ;x=1"]), Some(b"a".to_vec()));
        assert_eq!(pick(&["sessionid=a; sessionid="]), None);
        assert_eq!(
            pick(&["sessionid=\"a\\\"b\\073\""]),
            Some(b"a\"b;".to_vec())
        );
        assert_eq!(pick(&["other=1"]), None);
        assert_eq!(pick(&["sessionid"]), None);
        // Python strips Unicode whitespace too.
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            http::HeaderValue::from_bytes("sessionid=a; \u{a0}sessionid=b".as_bytes()).unwrap(),
        );
        assert_eq!(cookie(&h, "sessionid"), Some(b"b".to_vec()));
    }

    #[test]
    fn base62_as_django_writes_it() {
        assert_eq!(b62_decode("0"), Some(0));
        assert_eq!(b62_decode("z"), Some(61));
        assert_eq!(b62_decode("10"), Some(62));
        assert_eq!(b62_decode("-1"), Some(-1));
        assert_eq!(b62_decode(""), None);
        assert_eq!(b62_decode("!"), None);
    }

    proptest! {
        #[test]
        fn never_panics(text in "[ -~]{0,80}") {
            if let Ok(value) = text.parse() {
                let mut h = HeaderMap::new();
                h.insert(header::COOKIE, value);
                let _ = cookie(&h, "sessionid");
            }
            let _ = verify_signed(text.as_bytes(), &[b"k".to_vec()], 10, 100);
        }
    }
}
