//! One pub/sub connection to one Redis server, read by the task that hands
//! its messages on.
//!
//! Client libraries read pub/sub messages on their own task and push them
//! into a channel; fred's is a broadcast channel that overwrites when its
//! reader lags, which lost acknowledged events in bursts. Here the reader is
//! the consumer: a message is taken off the socket only when the previous
//! one was handed to the fan-out, so a burst waits in the kernel's socket
//! buffer and in Redis's output buffer for this client
//! (`client-output-buffer-limit pubsub`), never in an unbounded queue of
//! ours, and nothing is dropped silently. If Redis cuts the client off for
//! exceeding that limit, the bus sees the disconnect, counts it and
//! resubscribes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::resp::{self, Frame, RespError};

/// Where to connect and how to log in; taken from the Redis URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// TLS (`rediss://`), verified against `host`.
    pub tls: Option<super::tls::RedisTls>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `SELECT` after connecting (never on a Redis Cluster).
    pub database: Option<u8>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error("cannot connect to Redis at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("Redis at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("TLS to Redis at {0} failed: {1}")]
    Tls(String, std::io::Error),
    #[error(
        "Redis refused the credentials (check the password and username in the Redis URL): {0}"
    )]
    Auth(String),
    #[error("Redis refused SELECT: {0}")]
    Select(String),
    #[error("Redis refused a subscriber command: {0}")]
    Refused(String),
    #[error("the connection to Redis was closed")]
    Closed,
    #[error("reading from Redis failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] RespError),
}

/// What arrives on a subscribed connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// `subscribe`/`ssubscribe` confirmed for a channel.
    Subscribed(String),
    /// `unsubscribe`/`sunsubscribe`, asked for or not (a slot moved).
    Unsubscribed(String),
    Message {
        channel: String,
        payload: Bytes,
    },
    /// Redis refused a command; on a Cluster, `MOVED` means the slot moved.
    Refused(String),
    Pong,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// The reading half: owns the bytes read but not yet parsed.
pub struct Reader {
    half: ReadHalf<Box<dyn Stream>>,
    buf: BytesMut,
}

pub struct Writer {
    half: WriteHalf<Box<dyn Stream>>,
}

/// How much is read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// Connects, logs in and selects the database, within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(Reader, Writer), SubscriberError> {
    let addr = endpoint.to_string();
    let handshake = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| SubscriberError::Connect(addr.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match &endpoint.tls {
            None => Box::new(tcp),
            Some(tls) => {
                // SNI and verification use the host of the URL.
                let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| {
                    SubscriberError::Tls(
                        addr.clone(),
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                    )
                })?;
                let tls = tokio_rustls::TlsConnector::from(tls.0.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SubscriberError::Tls(addr.clone(), e))?;
                Box::new(tls)
            }
        };
        let (half, write) = tokio::io::split(stream);
        let mut reader = Reader {
            half,
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        let mut writer = Writer { half: write };
        if let Some(password) = &endpoint.password {
            let mut cmd = Vec::new();
            match &endpoint.username {
                Some(user) => resp::encode_command(&mut cmd, &["AUTH", user, password]),
                None => resp::encode_command(&mut cmd, &["AUTH", password]),
            }
            writer.send(&cmd).await?;
            if let Frame::Error(e) = reader.frame().await? {
                return Err(SubscriberError::Auth(String::from_utf8_lossy(&e).into()));
            }
        } else {
            // Without credentials a server that wants them answers NOAUTH
            // only to the first command; ask now so the error says so.
            let mut cmd = Vec::new();
            resp::encode_command(&mut cmd, &["PING"]);
            writer.send(&cmd).await?;
            if let Frame::Error(e) = reader.frame().await? {
                let e = String::from_utf8_lossy(&e).into_owned();
                return Err(if is_auth_error(&e) {
                    SubscriberError::Auth(e)
                } else {
                    SubscriberError::Refused(e)
                });
            }
        }
        if let Some(db) = endpoint.database.filter(|db| *db != 0) {
            let mut cmd = Vec::new();
            resp::encode_command(&mut cmd, &["SELECT", &db.to_string()]);
            writer.send(&cmd).await?;
            if let Frame::Error(e) = reader.frame().await? {
                return Err(SubscriberError::Select(String::from_utf8_lossy(&e).into()));
            }
        }
        Ok((reader, writer))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| SubscriberError::Timeout(addr.clone(), timeout))?
}

impl Writer {
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SubscriberError> {
        self.half.write_all(bytes).await?;
        self.half.flush().await?;
        Ok(())
    }
}

impl Reader {
    /// The next frame. Cancel-safe: bytes read stay in the buffer.
    async fn frame(&mut self) -> Result<Frame, SubscriberError> {
        loop {
            if let Some(frame) = resp::parse(&mut self.buf)? {
                return Ok(frame);
            }
            self.buf.reserve(READ_CHUNK);
            if self.half.read_buf(&mut self.buf).await? == 0 {
                return Err(SubscriberError::Closed);
            }
        }
    }

    /// The next push of a subscribed connection. Cancel-safe.
    pub async fn next(&mut self) -> Result<Push, SubscriberError> {
        loop {
            if let Some(push) = to_push(self.frame().await?) {
                return Ok(push);
            }
        }
    }
}

/// Redis's answers to missing or wrong credentials.
pub fn is_auth_error(message: &str) -> bool {
    // fred words it "Authentication Error: WRONGPASS ...", Redis itself
    // "WRONGPASS ..." or "NOAUTH ...".
    let upper = message.to_ascii_uppercase();
    upper.contains("WRONGPASS") || upper.contains("NOAUTH") || upper.contains("INVALID PASSWORD")
}

fn text(frame: &Frame) -> Option<String> {
    frame
        .as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Reads a RESP2 pub/sub push; `None` for what a subscriber ignores (the
/// counts of pattern subscriptions, an unexpected `+OK`).
fn to_push(frame: Frame) -> Option<Push> {
    let items = match frame {
        Frame::Array(items) => items,
        Frame::Error(e) => return Some(Push::Refused(String::from_utf8_lossy(&e).into())),
        Frame::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => return Some(Push::Pong),
        _ => return None,
    };
    let kind = items
        .first()
        .and_then(Frame::as_bytes)?
        .to_ascii_lowercase();
    match (kind.as_slice(), items.as_slice()) {
        (b"message" | b"smessage", [_, channel, payload]) => Some(Push::Message {
            channel: text(channel)?,
            payload: payload.as_bytes()?.clone(),
        }),
        (b"subscribe" | b"ssubscribe", [_, channel, ..]) => Some(Push::Subscribed(text(channel)?)),
        (b"unsubscribe" | b"sunsubscribe", [_, channel, ..]) => {
            Some(Push::Unsubscribed(text(channel)?))
        }
        (b"pong", _) => Some(Push::Pong),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::resp::tests::bulk;
    use super::*;

    #[test]
    fn reads_the_pushes_of_both_kinds_of_pub_sub() {
        assert_eq!(
            to_push(Frame::Array(vec![bulk("smessage"), bulk("c"), bulk("p")])),
            Some(Push::Message {
                channel: "c".into(),
                payload: Bytes::from_static(b"p")
            })
        );
        assert_eq!(
            to_push(Frame::Array(vec![
                bulk("ssubscribe"),
                bulk("c"),
                Frame::Integer(1)
            ])),
            Some(Push::Subscribed("c".into()))
        );
        assert_eq!(
            to_push(Frame::Array(vec![
                bulk("unsubscribe"),
                bulk("c"),
                Frame::Integer(0)
            ])),
            Some(Push::Unsubscribed("c".into()))
        );
        assert_eq!(
            to_push(Frame::Array(vec![bulk("pong"), bulk("")])),
            Some(Push::Pong)
        );
        assert_eq!(
            to_push(Frame::Error(Bytes::from_static(b"MOVED 1 x:1"))),
            Some(Push::Refused("MOVED 1 x:1".into()))
        );
        assert_eq!(to_push(Frame::Array(vec![bulk("message")])), None);
    }

    #[test]
    fn refused_credentials_are_recognised_in_either_wording() {
        assert!(is_auth_error(
            "WRONGPASS invalid username-password pair or user is disabled."
        ));
        assert!(is_auth_error("NOAUTH Authentication required."));
        assert!(is_auth_error(
            "Authentication Error: WRONGPASS invalid username-password pair"
        ));
        assert!(!is_auth_error(
            "LOADING Redis is loading the dataset in memory"
        ));
        assert!(!is_auth_error("Connection refused (os error 111)"));
    }
}
