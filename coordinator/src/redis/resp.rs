//! Just enough of RESP2, Redis's wire protocol, for a pub/sub connection:
//! encoding a command and parsing the replies and pushes that come back.
//!
//! The subscriber connection reads its own socket with this (see
//! `subscriber.rs`) instead of going through a client library, so that the
//! code that reads a message is the code that hands it on: when the fan-out
//! is full it stops reading, and Redis's output buffer, not a lossy channel
//! in between, absorbs the burst.

use bytes::{Buf, Bytes, BytesMut};

/// The largest reply accepted: Redis's own `proto-max-bulk-len` default.
pub const MAX_BULK: usize = 512 * 1024 * 1024;
/// Nesting and element counts a pub/sub connection never exceeds.
const MAX_ELEMENTS: usize = 1 << 20;
const MAX_DEPTH: usize = 8;

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Simple(Bytes),
    Error(Bytes),
    Integer(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Frame>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("Redis sent a malformed reply: {0}")]
    Malformed(&'static str),
    #[error("Redis sent a reply over {MAX_BULK} bytes")]
    TooLarge,
}

impl Frame {
    /// The bytes of a simple string or bulk string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Simple(b) | Frame::Bulk(b) => Some(b),
            _ => None,
        }
    }
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Takes one complete frame off the front of `buf`, or `None` if more bytes
/// are needed. Bulk payloads are split off without copying.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, RespError> {
    let Some(len) = frame_len(buf, 0, 0)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(len).freeze();
    Ok(Some(read(&mut frame)))
}

/// Position of the CRLF ending the line that starts at `at`.
fn line_end(buf: &[u8], at: usize) -> Option<usize> {
    buf.get(at..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| at + p)
}

fn parse_int(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Malformed("not an integer"))
}

/// The byte length of the complete frame starting at `at`, checking its
/// shape; `None` when it is not all there yet.
fn frame_len(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Malformed("nested too deep"));
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(end) = line_end(buf, at + 1) else {
        if buf.len() - at > 64 && kind != b'+' && kind != b'-' {
            return Err(RespError::Malformed("header line too long"));
        }
        return Ok(None);
    };
    let line = &buf[at + 1..end];
    let after = end + 2;
    match kind {
        b'+' | b'-' => Ok(Some(after - at)),
        b':' => parse_int(line).map(|_| Some(after - at)),
        b'$' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(RespError::TooLarge);
            }
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err(RespError::Malformed("bulk string without CRLF"));
            }
            Ok(Some(after + n + 2 - at))
        }
        b'*' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            if n as usize > MAX_ELEMENTS {
                return Err(RespError::Malformed("array too long"));
            }
            let mut pos = after;
            for _ in 0..n {
                match frame_len(buf, pos, depth + 1)? {
                    Some(len) => pos += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos - at))
        }
        _ => Err(RespError::Malformed("unknown type byte")),
    }
}

/// Reads a frame already checked by `frame_len`.
fn read(buf: &mut Bytes) -> Frame {
    let kind = buf[0];
    let end = line_end(buf, 1).unwrap_or(buf.len());
    let line = buf.slice(1..end);
    buf.advance(end + 2);
    match kind {
        b'+' => Frame::Simple(line),
        b'-' => Frame::Error(line),
        b':' => Frame::Integer(parse_int(&line).unwrap_or(0)),
        b'$' => match parse_int(&line).unwrap_or(-1) {
            n if n < 0 => Frame::Nil,
            n => {
                let data = buf.split_to(n as usize);
                buf.advance(2);
                Frame::Bulk(data)
            }
        },
        _ => match parse_int(&line).unwrap_or(-1) {
            n if n < 0 => Frame::Nil,
            n => Frame::Array((0..n).map(|_| read(buf)).collect()),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn bulk(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode_command(&mut out, &["SUBSCRIBE", "a:{b}"]);
        assert_eq!(out, b"*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\na:{b}\r\n");
    }

    #[test]
    fn parses_pushes_replies_and_errors() {
        let mut buf = BytesMut::from(
            &b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\no\r\n+OK\r\n-ERR no\r\n:42\r\n$-1\r\n"[..],
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Frame::Array(vec![
                bulk("message"),
                bulk("ch"),
                bulk("he\r\no")
            ]))
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Frame::Simple(Bytes::from_static(b"OK")))
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Frame::Error(Bytes::from_static(b"ERR no")))
        );
        assert_eq!(parse(&mut buf).unwrap(), Some(Frame::Integer(42)));
        assert_eq!(parse(&mut buf).unwrap(), Some(Frame::Nil));
        assert_eq!(parse(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_a_frame_split_anywhere() {
        let whole = b"*3\r\n$8\r\nsmessage\r\n$3\r\nabc\r\n$4\r\n\x00\x01\x02\x03\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
            buf.extend_from_slice(&whole[cut..]);
            let frame = parse(&mut buf).unwrap().unwrap();
            let Frame::Array(items) = frame else {
                panic!("not an array")
            };
            assert_eq!(
                items[2],
                Frame::Bulk(Bytes::from_static(b"\x00\x01\x02\x03"))
            );
        }
    }

    #[test]
    fn rejects_garbage_and_oversized_bulks() {
        assert!(parse(&mut BytesMut::from(&b"?x\r\n"[..])).is_err());
        assert!(parse(&mut BytesMut::from(&b"$abc\r\n"[..])).is_err());
        assert!(parse(&mut BytesMut::from(&b"$3\r\nabcXY"[..])).is_err());
        assert_eq!(
            parse(&mut BytesMut::from(&b"$999999999999\r\n"[..])),
            Err(RespError::TooLarge)
        );
        let deep = "*1\r\n".repeat(20);
        assert!(parse(&mut BytesMut::from(deep.as_bytes())).is_err());
    }
}
