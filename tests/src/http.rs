//! A minimal blocking HTTP/1.1 client for probing daemons from tests.
//!
//! One request per connection (`Connection: close`, the reply is read to EOF), over TCP or a Unix
//! socket, addressed exactly as daemons print it in `READY` (`127.0.0.1:4567`, or a path starting with
//! `/`). It is deliberately small and synchronous so any test can use it; it is not a general client
//! (no keep-alive, redirects or TLS); a streamed reply (SSE) is read as it arrives with [`open`]
//! and [`next_sse_data`]. A timeout surfaces as an `io::Error` of kind
//! `WouldBlock` or `TimedOut`, which is what "the daemon never answered" tests assert on.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected socket of either kind, with read and write timeouts set.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

/// Connects to `addr` (`host:port`, or a Unix socket path starting with `/`). `timeout` bounds the
/// TCP connect and every later read and write.
pub fn connect(addr: &str, timeout: Duration) -> io::Result<Stream> {
    if addr.starts_with('/') {
        let stream = UnixStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        return Ok(Stream::Unix(stream));
    }
    let sockaddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no address for {addr}"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&sockaddr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(Stream::Tcp(stream))
}

/// A complete HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, with chunked transfer encoding already removed.
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// `GET path` on `addr`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> io::Result<Reply> {
    request(addr, "GET", path, None, timeout)
}

/// `POST path` on `addr` with a JSON body.
pub fn post_json(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> io::Result<Reply> {
    let body = serde_json::to_vec(body).map_err(io::Error::other)?;
    request(
        addr,
        "POST",
        path,
        Some(("application/json", &body)),
        timeout,
    )
}

/// Sends one request and reads the whole reply (to EOF). `body` is `(content type, bytes)`.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> io::Result<Reply> {
    request_with_headers(addr, method, path, &[], body, timeout)
}

/// [`request`] with extra header lines (`(name, value)`), e.g. an `Authorization` header.
pub fn request_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> io::Result<Reply> {
    let mut stream = send(addr, method, path, headers, body, timeout)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

/// `POST path` with `body` sent as `content_type`, or with no `Content-Type` at all (what a
/// browser may send cross-site, for tests of what the daemons refuse).
pub fn post_typed(
    addr: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> io::Result<Reply> {
    let mut stream = connect(addr, timeout)?;
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

fn write_request(
    stream: &mut Stream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes)?;
    }
    stream.flush()
}

/// Sends one request (`Connection: close`) and returns the connection, for a reply read as raw
/// bytes (how they arrive is what some tests look at).
pub fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> io::Result<Stream> {
    let mut stream = connect(addr, timeout)?;
    write_request(&mut stream, method, path, headers, body)?;
    Ok(stream)
}

/// Sends one request (`Connection: close`) and returns the connection positioned at the start of
/// the body, with the status and the response head, for replies read as they arrive (SSE).
pub fn open(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> io::Result<(BufReader<Stream>, u16, String)> {
    let stream = send(addr, method, path, headers, body, timeout)?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    Ok((reader, status, head))
}

/// The next SSE `data:` payload of a reply opened with [`open`] (chunk-size lines, comments and
/// blank lines skipped); `None` once the connection ends.
pub fn next_sse_data(reader: &mut BufReader<Stream>) -> Option<String> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(data) = line.strip_prefix("data: ") {
            return Some(data.trim_end().to_owned());
        }
    }
}

/// Reads an OpenAI chat stream opened with [`open`] to its end: the chunks with content, and
/// whether `[DONE]` came last. Panics on a chunk that is not JSON.
pub fn read_chat_stream(mut reader: BufReader<Stream>) -> (usize, bool) {
    let mut chunks = 0;
    while let Some(data) = next_sse_data(&mut reader) {
        if data == "[DONE]" {
            return (chunks, true);
        }
        let chunk: serde_json::Value = serde_json::from_str(&data)
            .unwrap_or_else(|error| panic!("a stream chunk that is not JSON ({error}): {data}"));
        if chunk["choices"][0]["delta"]["content"].is_string() {
            chunks += 1;
        }
    }
    (chunks, false)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    if raw.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a reply",
        ));
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("reply has no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| invalid("headers are not UTF-8"))?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = find("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid(format!("bad content-length {length:?}")))?;
        rest.get(..length)
            .ok_or_else(|| invalid("body shorter than content-length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| invalid("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_reply;

    #[test]
    fn content_length_body_is_cut_to_length() {
        let reply =
            parse_reply(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}xx")
                .unwrap();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, b"{}");
    }

    #[test]
    fn chunked_body_is_reassembled() {
        let reply = parse_reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(reply.body, b"abcde");
        assert_eq!(reply.header("Transfer-Encoding"), Some("chunked"));
    }

    #[test]
    fn an_empty_reply_is_unexpected_eof() {
        let err = parse_reply(b"").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
