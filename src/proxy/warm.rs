//! Warming the cache: GET each URL of a list or a sitemap through a gateway,
//! so its answers are stored before clients ask. After a deploy every L1
//! starts empty; `gatehouse cache warm` (or `cache.warm` at start) fills it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// What a warm-up did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Fetched and stored.
    pub stored: usize,
    /// Already in the cache.
    pub hits: usize,
    /// Answered, but the response may not be stored (or the cache is off).
    pub not_stored: usize,
    /// URL and why.
    pub failed: Vec<(String, String)>,
}

/// The URLs of a list: a sitemap (`<loc>` elements), or one URL or path per
/// line, with `#` comments.
pub fn parse_list(text: &str) -> Vec<String> {
    if text.contains("<loc>") {
        return text
            .split("<loc>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</loc>"))
            .map(|(loc, _)| unescape_xml(loc.trim()))
            .filter(|loc| !loc.is_empty())
            .collect();
    }
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

fn unescape_xml(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// `http://host[:port]/path?query` or `/path?query` as (Host, origin-form
/// target); `None` for anything else.
fn target(url: &str, default_host: &str) -> Option<(String, String)> {
    // Nothing that could end the request line early.
    if url.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return None;
    }
    if url.starts_with('/') {
        return Some((default_host.to_string(), url.to_string()));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split('#').next().unwrap_or("/");
    (!host.is_empty() && !host.contains(['@', ' '])).then(|| (host.to_string(), path.to_string()))
}

/// GET `urls` through the gateway at `gateway`, `concurrency` at a time. A
/// URL's host is sent as `Host`; a path alone goes with `default_host`.
pub async fn warm(
    gateway: SocketAddr,
    default_host: &str,
    urls: &[String],
    concurrency: usize,
) -> Report {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(urls.len());
    for url in urls {
        let permits = Arc::clone(&permits);
        let url = url.clone();
        let default_host = default_host.to_string();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let Some((host, path)) = target(&url, &default_host) else {
                return (url, Err("not an http URL or an absolute path".to_string()));
            };
            let result = tokio::time::timeout(Duration::from_secs(30), get(gateway, &host, &path))
                .await
                .unwrap_or_else(|_| Err("no answer within 30s".into()));
            (url, result)
        }));
    }
    let mut report = Report::default();
    for task in tasks {
        let Ok((url, result)) = task.await else {
            continue;
        };
        match result {
            Ok((status, cache_status)) if status < 400 => {
                if cache_status.contains("; hit") {
                    report.hits += 1;
                } else if cache_status.contains("stored") {
                    report.stored += 1;
                } else {
                    report.not_stored += 1;
                }
            }
            Ok((status, _)) => report.failed.push((url, format!("status {status}"))),
            Err(e) => report.failed.push((url, e)),
        }
    }
    report
}

/// One GET on a connection of its own: the status and `Cache-Status`.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gatehouse-cache-warm\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "malformed answer".to_string())?;
    let cache_status = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("cache-status"))
        .map(|(_, value)| value.trim())
        .collect::<Vec<_>>()
        .join(", ");
    Ok((status, cache_status))
}

/// A list's text from a file (`-`: standard input) or an http URL (a
/// sitemap served by the site itself).
pub async fn read_source(source: &str) -> Result<String, String> {
    if source == "-" {
        // The command's own input, read once before anything else runs.
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("standard input: {e}"))?;
        return Ok(text);
    }
    if source.starts_with("http://") {
        let (host, path) = target(source, "").ok_or_else(|| format!("{source}: not a URL"))?;
        let addr = tokio::net::lookup_host(if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:80")
        })
        .await
        .map_err(|e| format!("{source}: {e}"))?
        .next()
        .ok_or_else(|| format!("{source}: no address"))?;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{source}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{source}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("{source}: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{source}: malformed answer"))?;
        if !head
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.starts_with('2'))
        {
            return Err(format!("{source}: {}", head.lines().next().unwrap_or("")));
        }
        return Ok(body.to_string());
    }
    tokio::fs::read_to_string(source)
        .await
        .map_err(|e| format!("{source}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sitemaps_and_lists_give_their_urls() {
        let sitemap = r#"<?xml version="1.0"?><urlset><url><loc> http://example.com/v1/stories/?a=1&amp;b=2 </loc></url>
            <url><loc>http://example.com/v1/users/1/</loc><lastmod>2026-01-01</lastmod></url></urlset>"#;
        assert_eq!(
            parse_list(sitemap),
            [
                "http://example.com/v1/stories/?a=1&b=2",
                "http://example.com/v1/users/1/"
            ]
        );
        let list =
            "# hot pages\n/v1/stories/\n\nhttp://example.com:8080/v1/search/?q=a  # search\n";
        assert_eq!(
            parse_list(list),
            ["/v1/stories/", "http://example.com:8080/v1/search/?q=a"]
        );
    }

    #[test]
    fn urls_become_a_host_and_a_target() {
        assert_eq!(
            target("http://Example.com:8080/a?b=1#frag", "x"),
            Some(("Example.com:8080".into(), "/a?b=1".into()))
        );
        assert_eq!(
            target("https://example.com", "x"),
            Some(("example.com".into(), "/".into()))
        );
        assert_eq!(target("/v1/", "site"), Some(("site".into(), "/v1/".into())));
        assert_eq!(target("ftp://example.com/", "x"), None);
        assert_eq!(target("http://user@evil/", "x"), None);
        assert_eq!(target("v1/stories/", "x"), None);
        assert_eq!(target("/a HTTP/1.1\r\nX-Evil: 1", "x"), None);
    }
}
