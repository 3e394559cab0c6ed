//! Pusher's webhook request, byte for byte: the JSON body, the signature
//! header and the id receivers deduplicate by.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Job;

/// `{"time_ms": …, "events": [...]}` with each event's Pusher fields.
pub fn body(time_ms: u64, jobs: &[Job]) -> String {
    let events: Vec<serde_json::Value> = jobs.iter().map(event).collect();
    serde_json::json!({ "time_ms": time_ms, "events": events }).to_string()
}

fn event(job: &Job) -> serde_json::Value {
    let mut e = serde_json::Map::new();
    e.insert("name".into(), job.name.clone().into());
    e.insert("channel".into(), job.channel.clone().into());
    for (field, value) in job.optional_fields() {
        if let Some(value) = value {
            e.insert(field.into(), value.clone().into());
        }
    }
    if let Some(n) = job.subscription_count {
        e.insert("subscription_count".into(), n.into());
    }
    serde_json::Value::Object(e)
}

/// `X-Pusher-Signature`: hex HMAC-SHA256 of the raw body with the app secret.
pub fn signature(secret: &str, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `X-Belfry-Webhook-Id`: the same for every attempt of a batch, and for the
/// same jobs to the same URL delivered again by the next leader.
pub fn webhook_id(url: &str, jobs: &[Job]) -> String {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the id is stable across processes.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    url.hash(&mut h);
    for job in jobs {
        job.id.hash(&mut h);
        job.name.hash(&mut h);
        job.channel.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_pusher() {
        // HMAC-SHA256 of "{}" with key "secret", from Python's hmac module.
        assert_eq!(
            signature("secret", "{}"),
            "77325902caca812dc259733aacd046b73817372c777b8d95b402647474516e13"
        );
    }

    #[test]
    fn the_body_has_pushers_fields() {
        let mut job = Job::new("a", "presence-x", "member_added");
        job.user_id = Some("7".into());
        let body: serde_json::Value = serde_json::from_str(&body(5, &[job])).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"time_ms": 5, "events": [
                {"name": "member_added", "channel": "presence-x", "user_id": "7"}
            ]})
        );
    }
}
