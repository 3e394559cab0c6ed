//! The HTTP client that POSTs webhook batches: one request per fresh
//! HTTP/1.1 connection, over TLS for `https://` URLs.
//!
//! A batch is sent at most a few times a second per URL, so a connection
//! pool would save little and would hold sockets to receivers between
//! bursts. `https://` trusts the system's roots; a private CA is added with
//! `SSL_CERT_FILE` (or `SSL_CERT_DIR`), which replace them.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::ClientConfig;

/// Why a POST got no status code. (A refusal is a status, not an error.)
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("bad url: {0}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("request: {0}")]
    Request(String),
    #[error("timed out")]
    TimedOut,
}

/// A webhook URL taken apart once, when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The `Host` header: the URL's host and port as written.
    pub authority: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("only http:// or https:// URLs are supported".into()),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("the URL has no host")?;
        // `[::1]` in a URL; the bare address to connect and verify.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if tls {
            ServerName::try_from(host.clone()).map_err(|e| format!("bad TLS name: {e}"))?;
        }
        Ok(Target {
            tls,
            // The URL's host and port as written, without any user info.
            authority: match uri.port() {
                Some(p) => format!("{}:{}", uri.host().unwrap_or_default(), p.as_str()),
                None => uri.host().unwrap_or_default().to_owned(),
            },
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
            host,
            port,
        })
    }
}

/// The signed request, without its connection.
pub struct Post<'a> {
    pub key: &'a str,
    pub signature: &'a str,
    pub id: &'a str,
    pub body: String,
}

/// The status code of one POST, or why none came.
pub async fn post(url: &str, request: Post<'_>) -> Result<u16, PostError> {
    let target = Target::parse(url).map_err(PostError::Url)?;
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(PostError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return exchange(tcp, &target, request).await;
    }
    let name =
        ServerName::try_from(target.host.clone()).map_err(|e| PostError::Url(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config().map_err(PostError::Tls)?)
        .connect(name, tcp)
        .await
        .map_err(|e| PostError::Tls(e.to_string()))?;
    exchange(tls, &target, request).await
}

/// Built on first use: reading the system store costs a few milliseconds.
fn tls_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            crate::redis::tls::client_config(None, "webhook receivers", "SSL_CERT_FILE")
        })
        .clone()
}

async fn exchange<S>(stream: S, target: &Target, request: Post<'_>) -> Result<u16, PostError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(PostError::Handshake)?;
    // Ends with the exchange: aborted below, and it owns nothing else.
    let conn = tokio::spawn(connection);
    let http = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("X-Pusher-Key", request.key)
        .header("X-Pusher-Signature", request.signature)
        .header("X-Belfry-Webhook-Id", request.id)
        .body(Full::new(Bytes::from(request.body)))
        .map_err(|e| PostError::Request(e.to_string()))?;
    let outcome = sender.send_request(http).await;
    let status = match outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            // Read the answer to the end so the receiver sees a clean exchange.
            let _ = response.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(PostError::Request(e.to_string())),
    };
    conn.abort();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart_with_their_default_ports() {
        let t = Target::parse("https://hooks.example.com/pusher?x=1").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("hooks.example.com", 443));
        assert_eq!(t.authority, "hooks.example.com");
        assert_eq!(t.path, "/pusher?x=1");
        let t = Target::parse("http://127.0.0.1:9000").unwrap();
        assert!(!t.tls);
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 9000, "/")
        );
        let t = Target::parse("https://[::1]:8443/h").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8443));
        assert_eq!(t.authority, "[::1]:8443");
        let t = Target::parse("https://user:pw@hooks.example.com:8443/h").unwrap();
        assert_eq!(
            t.authority, "hooks.example.com:8443",
            "no credentials in Host"
        );
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("hooks.example.com/h").is_err());
    }
}
