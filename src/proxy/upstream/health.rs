//! Active health checks: every `interval`, `GET path` on each server over a
//! fresh connection. A status below 500 within `timeout` readmits an ejected
//! server; anything else counts as one more failure toward ejection.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;

use super::{Server, UpstreamSet, drain};
use crate::config::HealthCheck;

/// Probe one server once.
pub async fn probe(server: &Server, check: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let mut sender = server
            .connect(check.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let request = Request::get(check.path.as_str())
            .header(header::HOST, server.host_header())
            .header(header::USER_AGENT, "gatehouse-health-check")
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let _ = drain(response.into_body()).await;
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
