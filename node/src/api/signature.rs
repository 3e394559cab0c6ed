//! HTTP API request signing, as the Pusher server SDKs do it: a signed string
//! of method, path and sorted query, a 600 s timestamp window, and the body's
//! md5. Every rejection says which part failed.

use md5::{Digest, Md5};

use super::ApiError;
use crate::config::AppConfig;
use crate::protocol::auth;

/// Requests signed more than this far from now are refused.
pub const MAX_CLOCK_SKEW_SECS: i64 = 600;

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_digit(bytes[i + 1]), hex_digit(bytes[i + 2]))
            {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The query string as decoded pairs.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

pub fn verify(
    app: &AppConfig,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    now_secs: i64,
) -> Result<(), ApiError> {
    let unauthorized = |m: &str| Err(ApiError::Unauthorized(m.to_owned()));
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(key) = get("auth_key") else {
        return unauthorized("auth_key is missing");
    };
    if key != app.key {
        return unauthorized("auth_key does not match the app");
    }
    let Some(signature) = get("auth_signature") else {
        return unauthorized("auth_signature is missing");
    };
    if get("auth_version").is_some_and(|v| v != "1.0") {
        return unauthorized("auth_version must be 1.0");
    }
    let Some(timestamp) = get("auth_timestamp").and_then(|t| t.parse::<i64>().ok()) else {
        return unauthorized("auth_timestamp is missing or not a number");
    };
    // abs_diff, not `(now - t).abs()`: that overflows for t near i64::MIN
    // and, wrapped, would pass the check.
    if now_secs.abs_diff(timestamp) > MAX_CLOCK_SKEW_SECS as u64 {
        return unauthorized("auth_timestamp is more than 600 seconds from the server's clock");
    }
    let md5 = hex::encode(Md5::digest(body));
    match get("body_md5") {
        Some(given) if !given.eq_ignore_ascii_case(&md5) => {
            return unauthorized("body_md5 does not match the body")
        }
        None if !body.is_empty() => return unauthorized("body_md5 is missing"),
        _ => {}
    }
    let mut signed: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_lowercase(), v.as_str()))
        .collect();
    signed.sort();
    let query = signed
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let message = format!("{method}\n{path}\n{query}");
    if !auth::verify(&app.secret, &message, signature) {
        return unauthorized("auth_signature is not valid for this request");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppConfig {
        AppConfig {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            ..AppConfig::default()
        }
    }

    fn signed(method: &str, path: &str, body: &[u8], ts: i64) -> Vec<(String, String)> {
        let mut params = vec![
            ("auth_key".to_owned(), "278d425bdf160c739803".to_owned()),
            ("auth_timestamp".to_owned(), ts.to_string()),
            ("auth_version".to_owned(), "1.0".to_owned()),
        ];
        if !body.is_empty() {
            params.push(("body_md5".into(), hex::encode(Md5::digest(body))));
        }
        let mut sorted = params.clone();
        sorted.sort();
        let q: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let sig = auth::sign(
            "7ad3773142a6692b25b8",
            &format!("{method}\n{path}\n{}", q.join("&")),
        );
        params.push(("auth_signature".into(), sig));
        params
    }

    #[test]
    fn a_timestamp_at_the_ends_of_i64_is_stale_not_an_overflow() {
        let now = 1_700_000_000i64;
        for ts in [
            now.wrapping_sub(1 << 63),
            i64::MIN,
            i64::MAX,
            now - 601,
            now + 601,
        ] {
            let params = signed("GET", "/apps/3/channels", b"", ts);
            let err = verify(&app(), "GET", "/apps/3/channels", &params, b"", now).unwrap_err();
            assert!(err.to_string().contains("600 seconds"), "{ts}: {err}");
        }
        let params = signed("GET", "/apps/3/channels", b"", now - 599);
        assert!(verify(&app(), "GET", "/apps/3/channels", &params, b"", now).is_ok());
    }

    #[test]
    fn accepts_a_correctly_signed_request() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let params = signed("POST", "/apps/3/events", body, 1_353_088_179);
        assert!(verify(
            &app(),
            "POST",
            "/apps/3/events",
            &params,
            body,
            1_353_088_179
        )
        .is_ok());
    }

    #[test]
    fn matches_the_pusher_documentation_example() {
        // Pusher's REST API auth docs: this exact request and signature.
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        let params = query_pairs(query);
        assert!(verify(
            &app(),
            "POST",
            "/apps/3/events",
            &params,
            body,
            1_353_088_179
        )
        .is_ok());
    }

    #[test]
    fn refuses_stale_tampered_or_mis_keyed_requests() {
        let body = br#"{"name":"x"}"#;
        let params = signed("POST", "/apps/3/events", body, 1000);
        let check = |p: &[(String, String)], b: &[u8], now| {
            verify(&app(), "POST", "/apps/3/events", p, b, now)
        };
        assert!(check(&params, body, 1000 + 601).is_err());
        assert!(check(&params, body, 1000 - 601).is_err());
        assert!(check(&params, body, 1000 + 599).is_ok());
        assert!(check(&params, br#"{"name":"y"}"#, 1000).is_err());
        let mut wrong_key = params.clone();
        wrong_key[0].1 = "other".into();
        assert!(check(&wrong_key, body, 1000).is_err());
        let no_md5: Vec<_> = params
            .iter()
            .filter(|(k, _)| k != "body_md5")
            .cloned()
            .collect();
        let err = check(&no_md5, body, 1000).unwrap_err();
        assert!(err.to_string().contains("body_md5"), "{err}");
        assert!(verify(&app(), "GET", "/apps/3/events", &params, body, 1000).is_err());
    }

    #[test]
    fn decodes_query_components() {
        assert_eq!(percent_decode("a%2Cb+c%"), "a,b c%");
        assert_eq!(
            query_pairs("info=user_count%2Csubscription_count&x"),
            vec![
                (
                    "info".to_owned(),
                    "user_count,subscription_count".to_owned()
                ),
                ("x".to_owned(), String::new())
            ]
        );
    }
}
