//! RESP on the wire: client requests in, upstream replies scanned, frames out.
//!
//! Three jobs, all pure (no sockets):
//!
//! * [`RequestParser`] turns client bytes into [`Request`]s: a RESP array of
//!   bulk strings or an inline command, nothing else. Every length is checked
//!   against [`Limits`] *as soon as its header is read*, before any byte of the
//!   body is buffered, so a client cannot make us reserve memory it did not send.
//! * [`ReplyScanner`] finds where one upstream reply ends (RESP2 and RESP3, any
//!   nesting) without allocating, iteratively (no recursion), with the same
//!   limits. redis-protocol 6 decodes recursively and preallocates from
//!   declared lengths, so nothing reaches it that this scanner has not already
//!   bounded; replies we only forward are forwarded as the exact bytes Redis
//!   sent, which keeps RESP3 map order and double formatting intact.
//! * Encoders for what we send: commands upstream (re-encoded from parsed
//!   arguments, never the client's raw bytes) and the proxy's own replies.
//!
//! Parsing is resumable: an incomplete frame keeps its progress, so a large
//! frame arriving in many reads is walked once, not once per read.

use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// Bounds on what one connection may make us hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string, in either direction.
    pub max_bulk_bytes: usize,
    /// Largest request (all arguments and framing together).
    pub max_request_bytes: usize,
    /// Most elements in one array (request arguments, or one reply aggregate).
    pub max_array_len: usize,
    /// Longest inline command line, and longest simple line in a reply.
    pub max_inline_bytes: usize,
    /// Deepest nesting of aggregates in a reply.
    pub max_reply_depth: usize,
    /// Largest single reply.
    pub max_reply_bytes: usize,
    /// The client has not logged in yet: requests are held to
    /// [`UNAUTHENTICATED_MAX_ARGS`] and [`UNAUTHENTICATED_MAX_BULK`], as Redis 7 does.
    pub unauthenticated: bool,
}

/// Most arguments in a request from a client that has not logged in.
pub const UNAUTHENTICATED_MAX_ARGS: usize = 10;
/// Largest bulk string from a client that has not logged in.
pub const UNAUTHENTICATED_MAX_BULK: usize = 16 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: 32 * 1024 * 1024,
            max_request_bytes: 64 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_inline_bytes: 64 * 1024,
            max_reply_depth: 64,
            max_reply_bytes: 256 * 1024 * 1024,
            unauthenticated: false,
        }
    }
}

impl Limits {
    /// These limits for a client that has not logged in yet.
    pub fn before_login(&self) -> Limits {
        Limits {
            unauthenticated: true,
            ..self.clone()
        }
    }
}

/// Why bytes could not be read as RESP. The text never quotes the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("expected '{expected}', got byte 0x{got:02x}")]
    UnexpectedByte { expected: char, got: u8 },
    #[error("invalid {what} length")]
    InvalidLength { what: &'static str },
    #[error("{what} of {len} exceeds the limit of {limit} (limits.{setting})")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
        setting: &'static str,
    },
    #[error("quotes in inline commands are not supported; send a RESP array")]
    QuotedInline,
    #[error("unknown reply type byte 0x{0:02x}")]
    UnknownReplyType(u8),
    #[error("malformed {0} line")]
    MalformedLine(&'static str),
    #[error("unauthenticated {0}")]
    Unauthenticated(&'static str),
}

/// One client command: its arguments, each a zero-copy view of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub args: Vec<Bytes>,
}

impl Request {
    /// The command name (first argument); requests are never empty.
    pub fn name(&self) -> &[u8] {
        &self.args[0]
    }
}

/// Resumable parser of client requests.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Arguments of the request in progress, as ranges into the buffer.
    args: Vec<Range<usize>>,
    /// Arguments the array header announced (0 = header not read yet).
    expected: usize,
    /// Where parsing resumes.
    pos: usize,
}

/// Longest `*<n>\r\n` / `$<n>\r\n` header we will look for a CRLF in.
const MAX_HEADER_LINE: usize = 24;

impl RequestParser {
    /// Parses the next complete request at the front of `buf`, removing its
    /// bytes. `Ok(None)`: more bytes are needed. An error is final for the
    /// connection: the stream can no longer be framed.
    pub fn next(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Request>, ProtocolError> {
        loop {
            if self.expected == 0 && self.pos == 0 {
                match buf.first() {
                    None => return Ok(None),
                    Some(b'*') => {}
                    Some(_) => match parse_inline(buf, limits)? {
                        Inline::Incomplete => return Ok(None),
                        Inline::Blank => continue,
                        Inline::Request(request) => return Ok(Some(request)),
                    },
                }
            }
            let header_pending = self.expected == 0;
            let before = buf.len();
            match self.next_multibulk(buf, limits)? {
                // `*0` or `*-1` was consumed: look for the next request.
                None if header_pending && self.expected == 0 && buf.len() < before => continue,
                parsed => return Ok(parsed),
            }
        }
    }

    fn next_multibulk(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Request>, ProtocolError> {
        if self.expected == 0 {
            let Some((count, body)) = read_length_line(buf, 0, b'*', "multibulk")? else {
                return Ok(None);
            };
            // As Redis: `*0` and negative counts are no requests at all.
            let Ok(count) = usize::try_from(count) else {
                let _ = buf.split_to(body);
                return Ok(None);
            };
            if count == 0 {
                let _ = buf.split_to(body);
                return Ok(None);
            }
            if limits.unauthenticated && count > UNAUTHENTICATED_MAX_ARGS {
                return Err(ProtocolError::Unauthenticated("multibulk length"));
            }
            check_limit("array length", count, limits.max_array_len, "max_array_len")?;
            self.expected = count;
            self.args = Vec::with_capacity(count.min(64));
            self.pos = body;
        }
        while self.args.len() < self.expected {
            let Some((len, body)) = read_length_line(buf, self.pos, b'$', "bulk")? else {
                return Ok(None);
            };
            let len =
                usize::try_from(len).map_err(|_| ProtocolError::InvalidLength { what: "bulk" })?;
            if limits.unauthenticated && len > UNAUTHENTICATED_MAX_BULK {
                return Err(ProtocolError::Unauthenticated("bulk length"));
            }
            check_limit("bulk length", len, limits.max_bulk_bytes, "max_bulk_bytes")?;
            let end = body + len;
            check_limit(
                "request size",
                end + 2,
                limits.max_request_bytes,
                "max_request_bytes",
            )?;
            if buf.len() < end + 2 {
                buf.reserve(end + 2 - buf.len());
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::MalformedLine("bulk terminator"));
            }
            self.args.push(body..end);
            self.pos = end + 2;
        }
        let frame = buf.split_to(self.pos).freeze();
        let args = self.args.drain(..).map(|r| frame.slice(r)).collect();
        self.expected = 0;
        self.pos = 0;
        Ok(Some(Request { args }))
    }
}

enum Inline {
    Incomplete,
    Blank,
    Request(Request),
}

/// An inline command: one line, arguments split on spaces and tabs.
fn parse_inline(buf: &mut BytesMut, limits: &Limits) -> Result<Inline, ProtocolError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        check_limit(
            "inline command",
            buf.len(),
            limits.max_inline_bytes,
            "max_inline_bytes",
        )?;
        return Ok(Inline::Incomplete);
    };
    check_limit(
        "inline command",
        newline,
        limits.max_inline_bytes,
        "max_inline_bytes",
    )?;
    let line = buf.split_to(newline + 1).freeze();
    let mut text = line.slice(..newline);
    if text.ends_with(b"\r") {
        text.truncate(newline - 1);
    }
    if text.iter().any(|&b| b == b'"' || b == b'\'') {
        return Err(ProtocolError::QuotedInline);
    }
    let args: Vec<Bytes> = text
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|part| !part.is_empty())
        .map(|part| text.slice_ref(part))
        .collect();
    if args.is_empty() {
        return Ok(Inline::Blank);
    }
    check_limit(
        "array length",
        args.len(),
        limits.max_array_len,
        "max_array_len",
    )?;
    Ok(Inline::Request(Request { args }))
}

/// Reads `<marker><integer>\r\n` at `at`, the integer as Redis's
/// `string2ll` reads it (no sign but `-`, no leading zeros, at most 18
/// digits); returns it and where the body starts. A line that cannot hold a
/// valid integer is an error at once, however few of its bytes arrived.
fn read_length_line(
    buf: &[u8],
    at: usize,
    marker: u8,
    what: &'static str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some(&first) = buf.get(at) else {
        return Ok(None);
    };
    if first != marker {
        return Err(ProtocolError::UnexpectedByte {
            expected: marker as char,
            got: first,
        });
    }
    let invalid = ProtocolError::InvalidLength { what };
    let window = &buf[at + 1..buf.len().min(at + 1 + MAX_HEADER_LINE)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        // Not complete yet: what arrived must still be able to become valid.
        if window.len() >= MAX_HEADER_LINE || !could_be_integer(window) {
            return Err(invalid);
        }
        return Ok(None);
    };
    let number = parse_string2ll(&window[..cr]).ok_or(invalid)?;
    let Some(&lf) = buf.get(at + 1 + cr + 1) else {
        return Ok(None);
    };
    if lf != b'\n' {
        return Err(ProtocolError::MalformedLine(what));
    }
    Ok(Some((number, at + 1 + cr + 2)))
}

/// A prefix of what `parse_string2ll` accepts.
fn could_be_integer(prefix: &[u8]) -> bool {
    let digits = prefix.strip_prefix(b"-").unwrap_or(prefix);
    digits.len() <= 18
        && digits.iter().all(u8::is_ascii_digit)
        && !(digits.len() > 1 && digits[0] == b'0')
}

/// Redis's `string2ll`, within 18 digits: `0`, or an optional `-` and a
/// number without leading zeros.
fn parse_string2ll(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') || (negative && digits == b"0")
    {
        return None;
    }
    let value = parse_decimal(digits)? as i64;
    Some(if negative { -value } else { value })
}

fn parse_decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0')),
    )
}

fn check_limit(
    what: &'static str,
    len: usize,
    limit: usize,
    setting: &'static str,
) -> Result<(), ProtocolError> {
    if len > limit {
        return Err(ProtocolError::TooLarge {
            what,
            len,
            limit,
            setting,
        });
    }
    Ok(())
}

/// What the first byte of a complete reply says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// `-` or `!`.
    Error,
    /// `>`: RESP3 out-of-band push.
    Push,
    /// `*` (RESP2 arrays, and RESP3 arrays).
    Array,
    /// Anything else: strings, numbers, nulls, maps, sets.
    Other,
}

/// Resumable, allocation-free framing of upstream replies.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    pos: usize,
    /// Elements still to read in each open aggregate, innermost last.
    open: Vec<usize>,
}

impl ReplyScanner {
    /// Length of the complete reply at the front of `buf`, or `None` when
    /// more bytes are needed. The caller removes those bytes and calls again.
    pub fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
        loop {
            check_limit(
                "reply size",
                self.pos,
                limits.max_reply_bytes,
                "max_reply_bytes",
            )?;
            let Some(element) = scan_element(buf, self.pos, limits)? else {
                return Ok(None);
            };
            self.pos = element.end;
            if element.children > 0 {
                if self.open.len() >= limits.max_reply_depth {
                    return Err(ProtocolError::TooLarge {
                        what: "reply nesting depth",
                        len: self.open.len() + 1,
                        limit: limits.max_reply_depth,
                        setting: "max_reply_depth",
                    });
                }
                self.open.push(element.children);
                continue;
            }
            // A finished element completes its parent, which may complete its own.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.pos;
                        self.pos = 0;
                        return Ok(Some(len));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

struct ScannedElement {
    /// Where the element's own bytes (header and body, not children) end.
    end: usize,
    /// Child elements that follow (aggregates), 0 for scalars.
    children: usize,
}

fn scan_element(
    buf: &[u8],
    at: usize,
    limits: &Limits,
) -> Result<Option<ScannedElement>, ProtocolError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(line_end) = find_line_end(buf, at + 1, limits)? else {
        return Ok(None);
    };
    let line = &buf[at + 1..line_end];
    let body = line_end + 2;
    let scalar = |end| Ok(Some(ScannedElement { end, children: 0 }));
    match kind {
        b'+' | b'-' | b',' | b'(' => scalar(body),
        b':' => {
            parse_signed(line).ok_or(ProtocolError::MalformedLine("integer"))?;
            scalar(body)
        }
        b'_' if line.is_empty() => scalar(body),
        b'#' if line == b"t" || line == b"f" => scalar(body),
        b'$' | b'!' | b'=' => {
            let len = parse_signed(line).ok_or(ProtocolError::InvalidLength { what: "bulk" })?;
            if len == -1 && kind == b'$' {
                return scalar(body);
            }
            let len =
                usize::try_from(len).map_err(|_| ProtocolError::InvalidLength { what: "bulk" })?;
            if limits.unauthenticated && len > UNAUTHENTICATED_MAX_BULK {
                return Err(ProtocolError::Unauthenticated("bulk length"));
            }
            check_limit("bulk length", len, limits.max_bulk_bytes, "max_bulk_bytes")?;
            let end = body + len;
            if buf.len() < end + 2 {
                check_limit(
                    "reply size",
                    end + 2,
                    limits.max_reply_bytes,
                    "max_reply_bytes",
                )?;
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::MalformedLine("bulk terminator"));
            }
            scalar(end + 2)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let len =
                parse_signed(line).ok_or(ProtocolError::InvalidLength { what: "aggregate" })?;
            if len == -1 && kind == b'*' {
                return scalar(body);
            }
            let len = usize::try_from(len)
                .map_err(|_| ProtocolError::InvalidLength { what: "aggregate" })?;
            check_limit("array length", len, limits.max_array_len, "max_array_len")?;
            let children = match kind {
                b'%' => len * 2,
                // An attribute is a map followed by the element it describes.
                b'|' => len * 2 + 1,
                _ => len,
            };
            scalar(body).map(|e| e.map(|e| ScannedElement { children, ..e }))
        }
        b'_' | b'#' => Err(ProtocolError::MalformedLine("null or boolean")),
        other => Err(ProtocolError::UnknownReplyType(other)),
    }
}

/// Index of the `\r` that ends the line starting at `from`.
fn find_line_end(buf: &[u8], from: usize, limits: &Limits) -> Result<Option<usize>, ProtocolError> {
    let window = &buf[from.min(buf.len())..buf.len().min(from + limits.max_inline_bytes + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && window[lf - 1] == b'\r' => Ok(Some(from + lf - 1)),
        Some(_) => Err(ProtocolError::MalformedLine("reply")),
        None if window.len() >= limits.max_inline_bytes + 2 => Err(ProtocolError::TooLarge {
            what: "reply line",
            len: window.len(),
            limit: limits.max_inline_bytes,
            setting: "max_inline_bytes",
        }),
        None => Ok(None),
    }
}

fn parse_signed(digits: &[u8]) -> Option<i64> {
    match digits.split_first() {
        Some((b'-', rest)) => parse_decimal(rest).map(|n| -(n as i64)),
        _ => parse_decimal(digits).map(|n| n as i64),
    }
}

/// A frame whose type only RESP3 has (null, boolean, double, big number,
/// blob error, verbatim string, map, set, push, attribute).
pub fn is_resp3_only(frame: &[u8]) -> bool {
    matches!(
        frame.first(),
        Some(b'_' | b'#' | b',' | b'(' | b'!' | b'=' | b'%' | b'~' | b'>' | b'|')
    )
}

/// The kind of a complete reply, from its first byte.
pub fn reply_kind(frame: &[u8]) -> ReplyKind {
    match frame.first() {
        Some(b'-' | b'!') => ReplyKind::Error,
        Some(b'>') => ReplyKind::Push,
        Some(b'*') => ReplyKind::Array,
        _ => ReplyKind::Other,
    }
}

/// The header and elements of a complete aggregate reply (`*`, `%`, `~`,
/// `>`); a map's keys and values alternate. `None` for anything else,
/// including null arrays.
pub fn aggregate_elements<'a>(
    frame: &'a [u8],
    limits: &Limits,
) -> Option<(&'a [u8], Vec<&'a [u8]>)> {
    let kind = *frame.first()?;
    if !matches!(kind, b'*' | b'%' | b'~' | b'>') {
        return None;
    }
    let line_end = frame.iter().position(|&b| b == b'\r')?;
    let count = parse_decimal(&frame[1..line_end])?;
    let count = if kind == b'%' { count * 2 } else { count };
    let header_end = line_end + 2;
    let mut elements = Vec::with_capacity(count.min(1024));
    let mut at = header_end;
    for _ in 0..count {
        let len = ReplyScanner::default()
            .scan(frame.get(at..)?, limits)
            .ok()??;
        elements.push(&frame[at..at + len]);
        at += len;
    }
    Some((&frame[..header_end], elements))
}

/// The number of an integer reply (`:n\r\n`), `None` for anything else.
pub fn integer(reply: &[u8]) -> Option<i64> {
    let digits = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The bytes of a bulk string reply (`$n\r\n...\r\n`), `None` for anything else.
pub fn bulk_body(element: &[u8]) -> Option<&[u8]> {
    if element.first() != Some(&b'$') {
        return None;
    }
    let line_end = element.iter().position(|&b| b == b'\r')?;
    let len = parse_decimal(&element[1..line_end])?;
    element.get(line_end + 2..line_end + 2 + len)
}

/// Decodes a complete, already scanned reply into frames, for the few
/// replies the proxy must look inside (pub/sub confirmations, messages).
pub fn decode_reply(frame: &Bytes) -> Option<redis_protocol::resp3::types::BytesFrame> {
    match redis_protocol::resp3::decode::complete::decode_bytes(frame) {
        Ok(decoded) => decoded.map(|(decoded, _)| decoded),
        // RESP2's null (`$-1`, `*-1`) is not RESP3: read as RESP2.
        Err(_) => redis_protocol::resp2::decode::decode_bytes(frame)
            .ok()
            .flatten()
            .map(|(decoded, _)| decoded.into_resp3()),
    }
}

/// Appends a command (array of bulk strings) to `out`.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    let body: usize = args.iter().map(|a| a.as_ref().len() + 16).sum();
    out.reserve(body + 16);
    encode_header(out, b'*', args.len());
    for arg in args {
        encode_bulk(out, arg.as_ref());
    }
}

/// Appends a bulk string.
pub fn encode_bulk(out: &mut BytesMut, value: &[u8]) {
    encode_header(out, b'$', value.len());
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Appends a length header: `*3`, `%2`, `$5`, ...
pub fn encode_header(out: &mut BytesMut, marker: u8, len: usize) {
    let mut digits = itoa::Buffer::new();
    out.put_u8(marker);
    out.put_slice(digits.format(len).as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends a simple string reply (`+OK`). `text` must hold no CR or LF.
pub fn encode_simple(out: &mut BytesMut, text: &str) {
    out.put_u8(b'+');
    put_line(out, text);
}

/// Appends an error reply. `text` starts with the error code (`ERR`,
/// `NOAUTH`, ...); CR and LF are replaced so the reply stays one frame.
pub fn encode_error(out: &mut BytesMut, text: &str) {
    out.put_u8(b'-');
    put_line(out, text);
}

fn put_line(out: &mut BytesMut, text: &str) {
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8], limits: &Limits) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(request) = parser.next(&mut buf, limits)? {
            out.push(request.args.iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn parses_multibulk_and_inline_requests() {
        let got = parse_all(
            b"*2\r\n$3\r\nGET\r\n$0\r\n\r\nPING\r\n\r\nset  a\tb\n",
            &Limits::default(),
        );
        assert_eq!(
            got.expect("valid"),
            vec![
                vec![b"GET".to_vec(), b"".to_vec()],
                vec![b"PING".to_vec()],
                vec![b"set".to_vec(), b"a".to_vec(), b"b".to_vec()],
            ]
        );
    }

    #[test]
    fn resumes_a_request_split_at_every_byte() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva\r\nl\r\n";
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for &byte in input.iter() {
            buf.put_u8(byte);
            if let Some(request) = parser.next(&mut buf, &Limits::default()).expect("valid") {
                got = Some(request);
            }
        }
        let request = got.expect("complete");
        assert_eq!(request.args[2].as_ref(), b"va\r\nl");
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_oversized_bulk_before_its_body_arrives() {
        let limits = Limits {
            max_bulk_bytes: 10,
            ..Limits::default()
        };
        let err = parse_all(b"*1\r\n$11\r\n", &limits).expect_err("too large");
        assert!(matches!(
            err,
            ProtocolError::TooLarge {
                setting: "max_bulk_bytes",
                ..
            }
        ));
        let err = parse_all(b"*1\r\n$99999999999999999999\r\n", &limits).expect_err("absurd");
        assert!(matches!(err, ProtocolError::InvalidLength { .. }));
    }

    #[test]
    fn rejects_oversized_arrays_and_requests() {
        let limits = Limits {
            max_array_len: 2,
            max_request_bytes: 20,
            ..Limits::default()
        };
        assert!(matches!(
            parse_all(b"*3\r\n", &limits),
            Err(ProtocolError::TooLarge {
                setting: "max_array_len",
                ..
            })
        ));
        assert!(matches!(
            parse_all(b"*2\r\n$4\r\nPING\r\n$9\r\n", &limits),
            Err(ProtocolError::TooLarge {
                setting: "max_request_bytes",
                ..
            })
        ));
    }

    #[test]
    fn rejects_malformed_requests() {
        let limits = Limits::default();
        for bad in [
            &b"*1\r\n:1\r\n"[..],
            b"*1\r\n$-1\r\n",
            b"*01\r\n$4\r\nPING\r\n",
            b"*1\r\n$04\r\nPING\r\n",
            b"*1\r\n$-0\r\n",
            b"*+1\r\n",
            b"*1\r\n$3\r\nGETX\r\n",
            b"*1x\r\n",
            b"*1\r\n$3\r\nGET\n\n",
            b"*1\r\n$+3\r\nGET\r\n",
            b"GET \"a b\"\r\n",
        ] {
            assert!(
                parse_all(bad, &limits).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn empty_and_negative_arrays_are_no_requests_as_in_redis() {
        let got = parse_all(
            b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n*0\r\n",
            &Limits::default(),
        );
        assert_eq!(got.expect("valid"), vec![vec![b"PING".to_vec()]]);
    }

    #[test]
    fn a_length_line_too_long_to_be_valid_fails_before_it_ends() {
        for partial in [
            &b"*1\r\n$12345678901234567890123"[..],
            b"*12345678901234567890123",
            b"*1\r\n$1234567890123456789",
            b"*1\r\n$00",
            b"*1\r\n$1x",
        ] {
            assert!(
                parse_all(partial, &Limits::default()).is_err(),
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
        // A prefix of a valid line waits for the rest.
        assert!(
            parse_all(b"*1\r\n$123456789012345678", &Limits::default())
                .expect("incomplete")
                .is_empty()
        );
    }

    #[test]
    fn a_client_not_logged_in_sends_small_requests_only() {
        let before = Limits::default().before_login();
        assert_eq!(
            parse_all(b"*11\r\n", &before),
            Err(ProtocolError::Unauthenticated("multibulk length"))
        );
        assert_eq!(
            parse_all(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n", &before),
            Err(ProtocolError::Unauthenticated("bulk length"))
        );
        let ten = b"*10\r\n"
            .iter()
            .copied()
            .chain(b"$1\r\nx\r\n".repeat(10))
            .collect::<Vec<_>>();
        assert_eq!(parse_all(&ten, &before).expect("ten arguments").len(), 1);
        assert!(
            parse_all(b"*11\r\n", &Limits::default())
                .expect("after login")
                .is_empty()
        );
    }

    #[test]
    fn bounds_inline_lines_without_a_newline() {
        let limits = Limits {
            max_inline_bytes: 8,
            ..Limits::default()
        };
        assert!(parse_all(b"PING", &limits).expect("incomplete").is_empty());
        assert!(parse_all(b"PINGPINGPING", &limits).is_err());
    }

    fn scan_all(input: &[u8], limits: &Limits) -> Result<Vec<usize>, ProtocolError> {
        let mut scanner = ReplyScanner::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(len) = scanner.scan(&buf, limits)? {
            let _ = buf.split_to(len);
            out.push(len);
        }
        assert!(buf.is_empty(), "left over bytes");
        Ok(out)
    }

    #[test]
    fn scans_every_resp3_type() {
        let input: &[u8] =
            b"+OK\r\n-ERR x\r\n:-5\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n_\r\n#t\r\n,1.5\r\n(123\r\n\
!3\r\nerr\r\n=7\r\ntxt:abc\r\n*2\r\n$1\r\na\r\n*0\r\n%1\r\n+k\r\n~1\r\n:1\r\n>2\r\n+a\r\n+b\r\n\
|1\r\n+ttl\r\n:3\r\n+v\r\n";
        let lens = scan_all(input, &Limits::default()).expect("valid");
        assert_eq!(lens.len(), 16);
        assert_eq!(lens.iter().sum::<usize>(), input.len());
    }

    #[test]
    fn scanner_resumes_across_partial_reads() {
        let input = b"*3\r\n$5\r\nhello\r\n*1\r\n:1\r\n+x\r\n+next\r\n";
        let mut scanner = ReplyScanner::default();
        let mut buf = BytesMut::new();
        let mut lens = Vec::new();
        for &byte in input.iter() {
            buf.put_u8(byte);
            while let Some(len) = scanner.scan(&buf, &Limits::default()).expect("valid") {
                let _ = buf.split_to(len);
                lens.push(len);
            }
        }
        assert_eq!(lens, vec![input.len() - 7, 7]);
    }

    #[test]
    fn scanner_bounds_depth_and_lengths() {
        let limits = Limits {
            max_reply_depth: 3,
            max_bulk_bytes: 4,
            ..Limits::default()
        };
        assert!(scan_all(b"*1\r\n*1\r\n*1\r\n:1\r\n", &limits).is_ok());
        assert!(matches!(
            scan_all(b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", &limits),
            Err(ProtocolError::TooLarge {
                setting: "max_reply_depth",
                ..
            })
        ));
        assert!(matches!(
            scan_all(b"$5\r\n", &limits),
            Err(ProtocolError::TooLarge {
                setting: "max_bulk_bytes",
                ..
            })
        ));
        let deep = b"*1\r\n".repeat(100_000);
        assert!(scan_all(&deep, &Limits::default()).is_err());
    }

    #[test]
    fn scanner_rejects_malformed_replies() {
        for bad in [
            &b"?\r\n"[..],
            b"+OK\n",
            b"$3\r\nabcd\r\n",
            b"_x\r\n",
            b"#x\r\n",
            b":x\r\n",
            b"*-2\r\n",
        ] {
            assert!(
                scan_all(bad, &Limits::default()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encodes_commands_and_replies() {
        let mut out = BytesMut::new();
        encode_command(&mut out, &[&b"SET"[..], b"k", b""]);
        encode_simple(&mut out, "OK");
        encode_error(&mut out, "ERR a\r\nb");
        assert_eq!(
            &out[..],
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n+OK\r\n-ERR a  b\r\n"
        );
    }
}
