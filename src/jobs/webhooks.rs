//! Webhook delivery: the outbox rows that status changes write (`Store::queue_webhooks`) are
//! POSTed to their endpoints with OpenAI's event payload and Standard Webhooks headers, and
//! retried with backoff until an endpoint answers 2xx. Rows outlive restarts, every attempt of
//! one row carries the same `webhook-id`, and an endpoint hears of one job's events in order.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::now;
use super::store::{Delivery, Store, WebhookTarget};
use crate::config::WebhookConfig;

/// An endpoint ready to sign for.
struct Endpoint {
    key: Vec<u8>,
    timeout: Duration,
}

/// The store's view of the configured endpoints.
pub fn targets(webhooks: &[WebhookConfig]) -> Vec<WebhookTarget> {
    webhooks
        .iter()
        .map(|w| WebhookTarget {
            url: w.url.clone(),
            events: w.events.clone(),
        })
        .collect()
}

/// The event as OpenAI sends it: the same bytes on every attempt.
pub fn payload(d: &Delivery) -> String {
    serde_json::json!({
        "id": d.id,
        "object": "event",
        "created_at": d.created_at,
        "type": d.kind,
        "data": {"id": d.job_id},
    })
    .to_string()
}

/// `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `<id>.<timestamp>.<body>`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// Seconds until the next attempt after `attempts` failed ones: 1, 2, 4, … 256.
fn backoff(attempts: i64) -> i64 {
    1i64 << attempts.clamp(0, 8)
}

/// Deliver due rows until `stop`; an endpoint no longer configured keeps its rows for a later
/// start that has it again.
pub async fn run(store: Store, webhooks: Vec<WebhookConfig>, stop: CancellationToken) {
    let mut endpoints = HashMap::new();
    for w in &webhooks {
        match w.key() {
            Ok(key) => {
                endpoints.insert(
                    w.url.clone(),
                    Endpoint {
                        key,
                        timeout: Duration::from_secs(w.timeout_seconds.max(1)),
                    },
                );
            }
            Err(e) => warn!(error = %e, "webhook endpoint skipped"),
        }
    }
    let client = reqwest::Client::builder()
        .user_agent(concat!("qlorad/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client without TLS configuration builds");
    info!(endpoints = endpoints.len(), "webhook delivery started");
    // Claimed for as long as a batch could take, every attempt timing out.
    const BATCH: i64 = 8;
    let slowest = endpoints
        .values()
        .map(|e| e.timeout)
        .max()
        .unwrap_or_default();
    let lease = BATCH * slowest.as_secs() as i64 + 10;
    loop {
        match store.due_deliveries(BATCH, lease).await {
            Ok(due) => {
                for d in due {
                    let Some(ep) = endpoints.get(&d.endpoint) else {
                        continue;
                    };
                    deliver(&store, &client, ep, &d).await;
                }
            }
            Err(e) => warn!(error = %e, "reading the webhook outbox failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => break,
        }
    }
}

async fn deliver(store: &Store, client: &reqwest::Client, ep: &Endpoint, d: &Delivery) {
    let body = payload(d);
    let ts = now();
    let sent = client
        .post(&d.endpoint)
        .timeout(ep.timeout)
        .header("content-type", "application/json")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature(&ep.key, &d.id, ts, &body))
        .body(body)
        .send()
        .await;
    let failure = match sent {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("the endpoint answered {}", r.status())),
        Err(e) if e.is_timeout() => Some(format!("no answer within {:?}", ep.timeout)),
        Err(e) => Some(e.to_string()),
    };
    let recorded = match &failure {
        None => store.delivered(&d.id).await,
        Some(e) => {
            warn!(webhook.id = %d.id, job.id = %d.job_id, endpoint = %d.endpoint, attempt = d.attempts + 1, error = %e, "webhook delivery failed; will retry");
            store
                .delivery_failed(&d.id, now() + backoff(d.attempts), e)
                .await
        }
    };
    if let Err(e) = recorded {
        // The row stays due: the endpoint may hear it again, which at-least-once allows.
        warn!(webhook.id = %d.id, error = %e, "recording a webhook delivery failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example, which OpenAI's client verifies too.
    #[test]
    fn signatures_match_the_standard_webhooks_vector() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(
            (0..12).map(backoff).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 256, 256, 256]
        );
    }
}
