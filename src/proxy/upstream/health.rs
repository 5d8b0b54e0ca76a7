//! Active health checks: every `interval`, `GET path` on each server over a
//! fresh connection. A status below 500 within `timeout` readmits an ejected
//! server; anything else counts as one more failure toward ejection.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, header};

use super::h1::{self, ReadTimer};
use super::{Server, UpstreamSet};
use crate::config::HealthCheck;

/// Probe one server once.
pub async fn probe(server: &Server, check: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let mut conn = server
            .connect(check.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, server.host_header());
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("gatehouse-health-check"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let head = h1::encode_head(&Method::GET, &check.path, &headers, None, b"");
        conn.send(head, &[]).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + check.timeout;
        let mut timer = ReadTimer::new(None, deadline, check.timeout);
        let mut response = conn
            .read_head(&Method::GET, &mut timer)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.parts.status;
        while let Ok(Some(_)) = conn.next_chunk(&mut response.body, &mut timer).await {}
        if status.is_server_error() {
            Err(format!("health check answered {status}"))
        } else {
            Ok(())
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .map_err(|_| format!("health check timed out after {:?}", check.timeout))?
}

/// Probe every server of `set` once, concurrently, and record the results.
pub async fn check_all(set: &Arc<UpstreamSet>, check: &HealthCheck) {
    let probes = set.servers.iter().map(|server| {
        let server = Arc::clone(server);
        let check = check.clone();
        let max_fails = set.config.max_fails;
        tokio::spawn(async move {
            match probe(&server, &check).await {
                Ok(()) => server.record_success(),
                Err(reason) => {
                    tracing::debug!(upstream = %server.label, %reason, "health check failed");
                    server.record_failure(max_fails);
                }
            }
        })
    });
    for probe in probes.collect::<Vec<_>>() {
        let _ = probe.await;
    }
}
