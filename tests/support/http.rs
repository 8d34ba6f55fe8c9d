//! A plain HTTP/1.1 GET over a socket, for the endpoints `handoff` serves (`--metrics`,
//! `handoff web`): no client library between the test and what the server wrote.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

/// What a GET answered: the status, the head's lines (lower case) and the body (as its
/// `Content-Length` says, or a chunked one put together).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// How long a whole request may take (the console waits up to 35 s for handoff).
const DEADLINE: Duration = Duration::from_secs(40);

/// `GET path` on `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Response> {
    http_get_as(addr, path, &addr.to_string())
}

/// `GET path` on `addr` with `host` as the `Host` header.
pub fn http_get_as(addr: SocketAddr, path: &str, host: &str) -> Result<Response> {
    http_request(addr, "GET", path, &[("Host", host)], b"")
        .with_context(|| format!("GET {path} on {addr}"))
}

/// A POST of an HTML form's fields (percent-encoded here) to `path` on `addr`, with the
/// extra `headers`.
pub fn http_post_form(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    fields: &[(&str, &str)],
) -> Result<Response> {
    let body = fields
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let host = addr.to_string();
    let mut all = vec![
        ("Host", host.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    all.extend_from_slice(headers);
    http_request(addr, "POST", path, &all, body.as_bytes())
        .with_context(|| format!("POST {path} on {addr}"))
}

fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request: `method path`, the `headers` (a `Host` among them), the `body` with its
/// `Content-Length`; the connection closes after the answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let deadline = Instant::now() + DEADLINE;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no complete answer within {DEADLINE:?}");
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        // A server may keep the connection open after an answer of known length.
        if complete(&raw) {
            break;
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {} bytes", raw.len()))?;
    let head = String::from_utf8(raw[..split].to_vec())?.to_ascii_lowercase();
    let rest = &raw[split + 4..];
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head}"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    let body = if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length:") {
        let length: usize = length.parse()?;
        if rest.len() != length {
            bail!(
                "the body has {} bytes, Content-Length says {length}",
                rest.len()
            );
        }
        rest.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        head,
        body: String::from_utf8(body)?,
    })
}

/// Whether `raw` holds a whole answer: its head, and as many bytes as its
/// `Content-Length` says (or a chunked body's last chunk).
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = raw.len() - split - 4;
    if head.contains("transfer-encoding: chunked") || head.contains("transfer-encoding:chunked") {
        return raw.ends_with(b"\r\n0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|length| body >= length)
}

/// A chunked body put together: each chunk's size (hex, extensions after `;`), CRLF,
/// the bytes, CRLF; a zero size ends it.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a chunk without its size line"))?;
        let line = std::str::from_utf8(&rest[..eol])?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 || &rest[size..size + 2] != b"\r\n" {
            bail!("a short or unterminated chunk");
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
