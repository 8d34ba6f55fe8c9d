//! A plain HTTP/1.1 GET over a socket, for the endpoints `handoff` serves (`--metrics`,
//! `handoff web`): no client library between the test and what the server wrote.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, Result};

/// What a GET answered: the status, the head's lines (lower case) and the body (a
/// chunked one put together).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` on `addr`, with the connection closed after it.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response: {response}"))?;
    let head = head.to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head}"))?;
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest
                .split_once("\r\n")
                .ok_or_else(|| anyhow!("bad chunk in {body}"))?;
            let size = usize::from_str_radix(size.trim(), 16)?;
            if size == 0 {
                break;
            }
            out.push_str(after.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
            rest = after.get(size + 2..).unwrap_or_default();
        }
        out
    } else {
        body.to_owned()
    };
    Ok(Response { status, head, body })
}
