//! Signatures: HMAC-SHA256 in hex over the strings the reference defines,
//! always compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub fn sign(secret: &str, message: &str) -> String {
    hex::encode(mac(secret, message).finalize().into_bytes())
}

fn mac(secret: &str, message: &str) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(message.as_bytes());
    mac
}

/// Whether `hex_signature` is the signature of `message`, in constant time.
pub fn verify(secret: &str, message: &str, hex_signature: &str) -> bool {
    match hex::decode(hex_signature) {
        Ok(bytes) => mac(secret, message).verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

/// Checks an `auth` field of the form `"{key}:{hexsig}"`.
pub fn verify_key_signature(key: &str, secret: &str, message: &str, auth: &str) -> bool {
    match auth.split_once(':') {
        Some((given_key, signature)) => {
            // The key is public; only the signature needs constant time.
            given_key == key && verify(secret, message, signature)
        }
        None => false,
    }
}

/// Private and encrypted channels: `"{socket_id}:{channel}"`.
pub fn channel_message(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// User authentication: `"{socket_id}::user::{user_data}"`.
pub fn signin_message(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_pusher_documentation_example() {
        // From Pusher's auth signature docs: key 278d425bdf160c739803,
        // secret 7ad3773142a6692b25b8, socket 1234.1234, channel private-foobar.
        let sig = sign("7ad3773142a6692b25b8", "1234.1234:private-foobar");
        assert_eq!(
            sig,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let auth = format!("278d425bdf160c739803:{sig}");
        assert!(verify_key_signature(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234:private-foobar",
            &auth
        ));
    }

    #[test]
    fn wrong_key_secret_or_garbage_fails() {
        let sig = sign("s", "m");
        assert!(verify("s", "m", &sig));
        assert!(!verify("t", "m", &sig));
        assert!(!verify("s", "m2", &sig));
        assert!(!verify("s", "m", "zz"));
        assert!(!verify("s", "m", &sig[..10]));
        assert!(!verify_key_signature(
            "k",
            "s",
            "m",
            &format!("other:{sig}")
        ));
        assert!(!verify_key_signature("k", "s", "m", &sig));
    }

    #[test]
    fn presence_message_includes_channel_data() {
        assert_eq!(
            channel_message("1.2", "presence-a", Some("{\"user_id\":1}")),
            "1.2:presence-a:{\"user_id\":1}"
        );
        assert_eq!(signin_message("1.2", "{}"), "1.2::user::{}");
    }
}
