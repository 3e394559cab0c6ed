//! A deliberately small WebSocket client: the HTTP/1.1 upgrade, masked client
//! frames and in-place parsing of the unmasked frames a server sends.
//!
//! It exists so the load generator costs far less per delivered frame than the
//! server it measures: frames are parsed straight out of one read buffer per
//! connection, nothing is allocated per frame, and the handshake skips what a
//! benchmark does not need (extensions, subprotocols, checking the accept key).
//! It is not a general client: no TLS, no compression, no automatic pong (the
//! caller answers pings, see `fleet`).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest server frame accepted; a benchmark event is far smaller.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest upgrade response accepted.
const MAX_HANDSHAKE: usize = 16 * 1024;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Where a client connects: a resolved address plus the request line parts.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host_header: String,
    /// Path prefix from the URL, without a trailing slash ("" or "/ws").
    pub prefix: String,
}

impl Endpoint {
    /// Parses `ws://host:port[/prefix]` or `http://host:port[/prefix]`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow::anyhow!("{url}: only ws:// and http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let authority_with_port = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = authority_with_port
            .to_socket_addrs()?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| anyhow::anyhow!("{url}: no IPv4 address"))?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "{url}: the generator only drives servers on loopback"
        );
        Ok(Endpoint {
            addr,
            host_header: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// Opens a TCP connection, optionally from a chosen local address so one
/// generator can hold more sockets than one source address has ports.
pub async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        bind_no_port(&socket)?;
        socket.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Lets the kernel pick the source port at connect time (per destination)
/// instead of at bind time, where ports would run out across all peers.
fn bind_no_port(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid fd owned by `socket`, a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends the upgrade request and reads the response. Bytes that arrived after
/// the response headers (often the first frame) are left in `buf`.
pub async fn handshake(
    stream: &mut TcpStream,
    host_header: &str,
    path_and_query: &str,
    buf: &mut BytesMut,
) -> io::Result<()> {
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: http://{host_header}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = &buf[..end];
            let ok = head.starts_with(b"HTTP/1.1 101") || head.starts_with(b"HTTP/1.0 101");
            if !ok {
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(io::Error::other(format!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(line)
                )));
            }
            buf.advance(end + 4);
            return Ok(());
        }
        if buf.len() > MAX_HANDSHAKE {
            return Err(io::Error::other("upgrade response too large"));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// First index of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// One server frame's header, parsed from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a server frame header. `Ok(None)` means more bytes are needed.
/// Servers must not mask their frames (RFC 6455 5.1), so a masked frame is an error.
pub fn parse_header(buf: &[u8]) -> io::Result<Option<FrameHeader>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    if buf[1] & 0x80 != 0 {
        return Err(io::Error::other("server sent a masked frame"));
    }
    let (header_len, payload_len) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as usize)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            (10, usize::try_from(len).unwrap_or(usize::MAX))
        }
        n => (2, n as usize),
    };
    if payload_len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "frame of {payload_len} bytes is too large"
        )));
    }
    Ok(Some(FrameHeader {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

/// Appends one masked client frame (FIN set) to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// Cheap per-connection generator of frame masks (xorshift); masks only need
/// to be unpredictable to browsers' victims, not to a benchmark's server.
#[derive(Debug, Clone)]
pub struct MaskSource(u64);

impl MaskSource {
    pub fn new(seed: u64) -> Self {
        MaskSource(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_mask(&mut self) -> [u8; 4] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 as u32).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else if payload.len() <= 65535 {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_all_three_length_forms() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let frame = server_frame(OP_TEXT, &payload);
            let h = parse_header(&frame).unwrap().unwrap();
            assert_eq!(h.payload_len, len);
            assert_eq!(h.total_len(), frame.len());
            assert!(h.fin);
            assert_eq!(h.opcode, OP_TEXT);
        }
    }

    #[test]
    fn incomplete_headers_need_more_bytes() {
        let frame = server_frame(OP_TEXT, &[b'y'; 70000]);
        for cut in 0..10 {
            assert_eq!(parse_header(&frame[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn masked_server_frames_are_rejected() {
        assert!(parse_header(&[0x81, 0x85, 1, 2, 3, 4, 0]).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_round_trip() {
        let mask = [1, 2, 3, 4];
        for len in [3usize, 200, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            encode_client_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out[0], 0x81);
            assert!(out[1] & 0x80 != 0, "mask bit");
            let header_len = match out[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let key = &out[header_len..header_len + 4];
            let body: Vec<u8> = out[header_len + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abc\r\n\r\nrest", b"\r\n\r\n"), Some(3));
        assert_eq!(find(b"aaab", b"ab"), Some(2));
        assert_eq!(find(b"short", b"longer needle"), None);
        assert_eq!(find(b"xyz", b"q"), None);
    }

    #[test]
    fn endpoints_keep_prefix_and_host() {
        let e = Endpoint::parse("ws://127.0.0.1:9000/ws/").unwrap();
        assert_eq!(e.addr.port(), 9000);
        assert_eq!(e.prefix, "/ws");
        assert_eq!(e.host_header, "127.0.0.1:9000");
        assert!(Endpoint::parse("wss://127.0.0.1:1").is_err());
    }
}
