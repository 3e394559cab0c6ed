//! TLS for clients (`wss://` and `https://` on the main port), with rustls.
//!
//! The handshake and the HTTP requests go through tokio-rustls. After a
//! WebSocket upgrade Belfry frames the socket itself, and the fan-out writes
//! to it from other tasks without awaiting (`try_write`), so the socket the
//! connection and its outbox hold is a `Socket`: plain TCP, or TCP with the
//! rustls session driven without blocking. The certificate and key are read
//! at start and again on SIGHUP; a new pair that does not load is logged and
//! the old one kept.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::{Mutex, RwLock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ServerConfig, ServerConnection};

/// Where the certificate and key are read from, and the configuration built
/// from them last.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the pair; an error names the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, String> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(config),
        }))
    }

    /// The acceptor for a new connection, with the pair loaded last.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }

    /// Reads the files again; connections already open keep their session.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.cert, &self.key)?;
        *self.current.write() = config;
        Ok(())
    }

    /// Reloads on every SIGHUP until `stop`.
    pub async fn reload_on_sighup(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(hup) => hup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the TLS certificate will not be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.cert.display(), "SIGHUP: TLS certificate and key reloaded")
                }
                Err(e) => tracing::error!(
                    "SIGHUP: TLS certificate not reloaded, the previous one stays in use: {e}"
                ),
            }
        }
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read tls_cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls_cert {} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read a private key from tls_key {}: {e}",
            key.display()
        )
    })?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls_cert and tls_key do not make a usable pair: {e}"))?;
    // The WebSocket upgrade needs HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The socket of an upgraded WebSocket connection.
pub enum Socket {
    Plain(TcpStream),
    /// Boxed: a rustls session is over a kilobyte, and plain sockets are
    /// the common case.
    Tls(Box<TlsSocket>),
}

pub struct TlsSocket {
    tcp: TcpStream,
    session: Mutex<ServerConnection>,
}

/// `std::io` over a non-blocking `TcpStream`, for rustls's `read_tls` and
/// `write_tls`.
struct NonBlocking<'a>(&'a TcpStream);

impl Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The outbox writes to the socket through this; it never reads.
impl crate::outbox::Wire for Socket {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        Socket::try_write(self, buf)
    }
}

impl Socket {
    pub fn tls(tcp: TcpStream, session: ServerConnection) -> Socket {
        Socket::Tls(Box::new(TlsSocket {
            tcp,
            session: Mutex::new(session),
        }))
    }

    /// Writes without waiting, like `TcpStream::try_write`. With TLS, `Ok`
    /// means the bytes were taken into the session; records the socket
    /// could not take yet are sent first by the next write, or by
    /// `readable`, which the connection task always awaits.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(tcp) => tcp.try_write(buf),
            Socket::Tls(s) => {
                let mut session = s.session.lock();
                if !s.send_records(&mut session)? {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = session.writer().write(buf)?;
                s.send_records(&mut session)?;
                Ok(n)
            }
        }
    }

    /// Reads without waiting, like `TcpStream::try_read`: plaintext, `Ok(0)`
    /// at the end of the stream, `WouldBlock` when nothing is there yet.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(tcp) => tcp.try_read(buf),
            Socket::Tls(s) => {
                let mut session = s.session.lock();
                loop {
                    match session.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // The peer closed without close_notify: the end.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    let got = session.read_tls(&mut NonBlocking(&s.tcp))?;
                    let state = session
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    // Alerts and key updates the session wants to answer.
                    let _ = s.send_records(&mut session);
                    if got == 0 && state.plaintext_bytes_to_read() == 0 {
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// Waits until `try_read` may have something. With TLS it also sends
    /// records left over from a write the socket could not take at once.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    /// `readable` as a poll. The connection task waits on this and on
    /// `poll_write_ready` in one `select!` for as long as a socket lives,
    /// so they are polls rather than stored futures: tokio's `readable()`
    /// future, wrapped in this enum's TLS loop, was 352 bytes of every idle
    /// connection. Only one task (the connection's) may wait on a socket.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = match self {
            Socket::Plain(tcp) => return tcp.poll_read_ready(cx),
            Socket::Tls(s) => s,
        };
        loop {
            let (buffered, unsent) = {
                let mut session = s.session.lock();
                let buffered = session
                    .process_new_packets()
                    .map(|state| state.plaintext_bytes_to_read() > 0)
                    .unwrap_or(true);
                (buffered, session.wants_write())
            };
            if buffered {
                return Poll::Ready(Ok(()));
            }
            if unsent {
                match s.tcp.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        // Sends what it can; a full socket clears the write
                        // readiness, so the next round registers and reads.
                        let mut session = s.session.lock();
                        if let Err(e) = s.send_records(&mut session) {
                            return Poll::Ready(Err(e));
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            return s.tcp.poll_read_ready(cx);
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Plain(tcp) => tcp.poll_write_ready(cx),
            Socket::Tls(s) => s.tcp.poll_write_ready(cx),
        }
    }
}

impl TlsSocket {
    /// Sends the session's pending records; `Ok(true)` once none is left,
    /// `Ok(false)` if the socket is full.
    fn send_records(&self, session: &mut ServerConnection) -> io::Result<bool> {
        while session.wants_write() {
            match session.write_tls(&mut NonBlocking(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}
