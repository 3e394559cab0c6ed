//! The WebSocket framing Belfry needs, without I/O: encoding server frames
//! straight into a connection's outgoing buffer, and decoding what clients
//! send (masked frames, fragments, control frames).
//!
//! tungstenite does this for general use, but it keeps buffers per socket
//! and copies each message through its own write path. Here a fanned-out
//! frame is appended to each recipient's buffer as header plus payload, and
//! an idle socket holds no buffer at all. tungstenite still provides the
//! handshake's accept key and is the reference these tests check against.

use bytes::{Buf, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Appends one unfragmented, unmasked server frame.
pub fn encode(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => out.extend_from_slice(&[n as u8]),
        n if n <= u16::MAX as usize => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with a status code and a reason (cut to fit the
/// 125-byte control frame limit on a character boundary).
pub fn encode_close(out: &mut BytesMut, code: u16, reason: &str) {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(out, OP_CLOSE, &payload);
}

/// A complete message or control frame from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary,
    Ping(Vec<u8>),
    Pong,
    Close,
}

/// Why the connection must close, as a WebSocket status code.
#[derive(Debug, PartialEq, Eq)]
pub enum Violation {
    /// 1002: not a valid client frame (unmasked, reserved bits, bad control frame).
    Protocol(&'static str),
    /// 1007: text that is not UTF-8.
    NotUtf8,
    /// 1009: a message over the limit.
    TooBig,
}

impl Violation {
    pub fn code(&self) -> u16 {
        match self {
            Violation::Protocol(_) => 1002,
            Violation::NotUtf8 => 1007,
            Violation::TooBig => 1009,
        }
    }
}

/// Decodes client frames. Holds bytes only while a frame or a fragmented
/// message is incomplete, so an idle connection keeps nothing allocated.
#[derive(Default)]
pub struct Decoder {
    partial: BytesMut,
    /// A fragmented message being collected: its opcode and bytes so far.
    message: Option<(u8, Vec<u8>)>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(Violation::Protocol("reserved bits set"));
    }
    let opcode = buf[0] & 0x0F;
    if buf[1] & 0x80 == 0 {
        return Err(Violation::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if opcode >= 0x8 && (len > 125 || !fin) {
        return Err(Violation::Protocol("invalid control frame"));
    }
    if len > max as u64 {
        return Err(Violation::TooBig);
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len: len as usize,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

impl Decoder {
    /// Whether bytes of an unfinished frame are being held.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.message.is_none()
    }

    /// Bytes held for an unfinished frame and an unfinished fragmented
    /// message: at most a header plus `max`, and `max`.
    pub fn held_bytes(&self) -> usize {
        self.partial.len() + self.message.as_ref().map_or(0, |(_, m)| m.len())
    }

    /// Decodes `data` (just read) into complete messages. `max` bounds a
    /// whole message, fragments included.
    pub fn feed(
        &mut self,
        data: &[u8],
        max: usize,
        out: &mut Vec<Incoming>,
    ) -> Result<(), Violation> {
        // Fast path: nothing pending, decode straight from the read buffer.
        if self.partial.is_empty() {
            let used = self.decode(data, max, out)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
            return Ok(());
        }
        self.partial.extend_from_slice(data);
        let buf = std::mem::take(&mut self.partial);
        let used = self.decode(&buf, max, out)?;
        if used < buf.len() {
            self.partial = BytesMut::from(&buf[used..]);
        }
        Ok(())
    }

    fn decode(
        &mut self,
        mut buf: &[u8],
        max: usize,
        out: &mut Vec<Incoming>,
    ) -> Result<usize, Violation> {
        let start = buf.len();
        while let Some(h) = parse_header(buf, max)? {
            if buf.len() < h.header_len + h.payload_len {
                break;
            }
            let mut payload = buf[h.header_len..h.header_len + h.payload_len].to_vec();
            buf.advance(h.header_len + h.payload_len);
            unmask(&mut payload, h.mask);
            match h.opcode {
                OP_PING => out.push(Incoming::Ping(payload)),
                OP_PONG => out.push(Incoming::Pong),
                OP_CLOSE => {
                    check_close(&payload)?;
                    out.push(Incoming::Close);
                    return Ok(start);
                }
                OP_TEXT | OP_BINARY if self.message.is_none() => {
                    if h.fin {
                        out.push(complete(h.opcode, payload)?);
                    } else {
                        self.message = Some((h.opcode, payload));
                    }
                }
                OP_CONTINUATION => {
                    let Some((opcode, mut so_far)) = self.message.take() else {
                        return Err(Violation::Protocol("continuation without a message"));
                    };
                    if so_far.len() + payload.len() > max {
                        return Err(Violation::TooBig);
                    }
                    so_far.extend_from_slice(&payload);
                    if h.fin {
                        out.push(complete(opcode, so_far)?);
                    } else {
                        self.message = Some((opcode, so_far));
                    }
                }
                OP_TEXT | OP_BINARY => {
                    return Err(Violation::Protocol("new message inside a fragmented one"))
                }
                _ => return Err(Violation::Protocol("unknown opcode")),
            }
        }
        Ok(start - buf.len())
    }
}

/// A close frame is empty, or a status code a peer may send (RFC 6455
/// 7.4: not 1004-1006 or 1015, which are never on the wire, nor anything
/// outside 1000-4999 that is not registered) with a UTF-8 reason.
fn check_close(payload: &[u8]) -> Result<(), Violation> {
    match payload {
        [] => Ok(()),
        [_] => Err(Violation::Protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(Violation::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| Violation::NotUtf8)?;
            Ok(())
        }
    }
}

fn complete(opcode: u8, payload: Vec<u8>) -> Result<Incoming, Violation> {
    if opcode == OP_BINARY {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| Violation::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Incoming>, Violation> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        d.feed(bytes, max, &mut out)?;
        Ok(out)
    }

    #[test]
    fn server_frames_match_tungstenite() {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload = "x".repeat(len);
            let mut ours = BytesMut::new();
            encode(&mut ours, OP_TEXT, payload.as_bytes());
            use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
            let mut theirs = Vec::new();
            Frame::message(payload.clone().into_bytes(), OpCode::Data(Data::Text), true)
                .format(&mut theirs)
                .unwrap();
            assert_eq!(&ours[..], &theirs[..], "length {len}");
        }
    }

    #[test]
    fn decodes_masked_text_split_anywhere() {
        let mut bytes = client_frame(true, OP_TEXT, b"{\"event\":\"pusher:ping\"}");
        bytes.extend(client_frame(true, OP_TEXT, "héllo".as_bytes()));
        for split in 0..bytes.len() {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            d.feed(&bytes[..split], 1000, &mut out).unwrap();
            d.feed(&bytes[split..], 1000, &mut out).unwrap();
            assert_eq!(
                out,
                vec![
                    Incoming::Text("{\"event\":\"pusher:ping\"}".into()),
                    Incoming::Text("héllo".into())
                ],
                "split at {split}"
            );
            assert!(d.is_idle());
        }
    }

    #[test]
    fn joins_fragments_and_answers_control_frames_between_them() {
        let mut bytes = client_frame(false, OP_TEXT, b"hel");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"lo"));
        assert_eq!(
            decode_all(&bytes, 100).unwrap(),
            vec![
                Incoming::Ping(b"p".to_vec()),
                Incoming::Text("hello".into())
            ]
        );
    }

    #[test]
    fn enforces_the_message_limit_across_fragments() {
        assert_eq!(
            decode_all(&client_frame(true, OP_TEXT, &[b'a'; 101]), 100),
            Err(Violation::TooBig)
        );
        let mut bytes = client_frame(false, OP_TEXT, &[b'a'; 60]);
        bytes.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 60]));
        assert_eq!(decode_all(&bytes, 100), Err(Violation::TooBig));
        // A huge declared length is refused from the header alone.
        assert_eq!(
            decode_all(&[0x81, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0], 100),
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(
            decode_all(&[0x81, 0x01, b'a'], 100),
            Err(Violation::Protocol("client frames must be masked"))
        );
        assert_eq!(
            decode_all(&client_frame(true, OP_TEXT, &[0xff, 0xfe]), 100),
            Err(Violation::NotUtf8)
        );
        assert!(decode_all(&client_frame(true, OP_CONTINUATION, b"x"), 100).is_err());
        assert!(decode_all(&client_frame(false, OP_PING, b"x"), 100).is_err());
        assert!(decode_all(&client_frame(true, 0x3, b"x"), 100).is_err());
        assert_eq!(
            decode_all(&client_frame(true, OP_CLOSE, &[3, 232]), 100).unwrap(),
            vec![Incoming::Close]
        );
        assert_eq!(
            decode_all(&client_frame(true, OP_BINARY, b"x"), 100).unwrap(),
            vec![Incoming::Binary]
        );
    }

    #[test]
    fn invalid_close_frames_are_protocol_errors() {
        for bad in [
            &999u16.to_be_bytes()[..],
            &1005u16.to_be_bytes(),
            &1006u16.to_be_bytes(),
            &5000u16.to_be_bytes(),
            &[3],
        ] {
            let err = decode_all(&client_frame(true, OP_CLOSE, bad), 100).unwrap_err();
            assert_eq!(err.code(), 1002, "{bad:?}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            decode_all(&client_frame(true, OP_CLOSE, &bad_reason), 100),
            Err(Violation::NotUtf8)
        );
        for good in [
            &b""[..],
            &1000u16.to_be_bytes(),
            &4999u16.to_be_bytes(),
            b"\x03\xe9bye",
        ] {
            assert_eq!(
                decode_all(&client_frame(true, OP_CLOSE, good), 100).unwrap(),
                vec![Incoming::Close]
            );
        }
    }

    #[test]
    fn close_frames_carry_code_and_a_short_reason() {
        let mut out = BytesMut::new();
        encode_close(&mut out, 4201, &"é".repeat(100));
        assert_eq!(out[0], 0x88);
        assert!(out[1] as usize <= 125);
        assert_eq!(&out[2..4], &4201u16.to_be_bytes());
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
