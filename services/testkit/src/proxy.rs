//! A TCP proxy between one NATS client and the server that can lose JetStream
//! acknowledgements: armed with [`AckDropper::drop_next_acks`], it swallows the next
//! publish acknowledgements (`{"stream":..,"seq":..}` replies) on their way to the
//! client, exactly as a network fault after the server stored the message would, of any
//! stream or of one stream only ([`AckDropper::drop_next_acks_of`]). The rest of the
//! protocol passes through untouched.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct AckDropper {
    port: u16,
    armed: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    /// Only acknowledgements of this stream are lost, when set.
    stream: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the relay shares with the dropper.
#[derive(Clone)]
struct Arming {
    armed: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    stream: Arc<Mutex<Option<String>>>,
}

impl AckDropper {
    /// Listens on an ephemeral loopback port and forwards to `upstream_port`.
    pub async fn start(upstream_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let arming = Arming {
            armed: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
            stream: Arc::new(Mutex::new(None)),
        };
        let shared = arming.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let arming = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        // Ignored: a connection ends when either side closes it.
                        let _ = relay(client, server, arming).await;
                    }
                });
            }
        });
        Ok(AckDropper {
            port,
            armed: arming.armed,
            dropped: arming.dropped,
            stream: arming.stream,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Loses the next `n` publish acknowledgements.
    pub fn drop_next_acks(&self, n: usize) {
        *self.stream.lock().expect("not poisoned") = None;
        self.armed.store(n, Ordering::SeqCst);
    }

    /// Loses the next `n` publish acknowledgements of `stream`; others pass.
    pub fn drop_next_acks_of(&self, stream: &str, n: usize) {
        *self.stream.lock().expect("not poisoned") = Some(stream.to_owned());
        self.armed.store(n, Ordering::SeqCst);
    }

    /// How many acknowledgements were lost so far.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for AckDropper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, arming: Arming) -> std::io::Result<()> {
    let Arming {
        armed,
        dropped,
        stream,
    } = arming;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upstream = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = sr.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // Forward every complete frame, swallowing acknowledgements while armed.
        while let Some(len) = frame_len(&buf) {
            let frame: Vec<u8> = buf.drain(..len).collect();
            let of = stream.lock().expect("not poisoned").clone();
            if is_pub_ack(&frame, of.as_deref())
                && armed
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                dropped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            cw.write_all(&frame).await?;
        }
    }
    upstream.abort();
    Ok(())
}

/// The length of the first complete protocol frame in `buf`, if it holds one.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    let line = std::str::from_utf8(&buf[..line_end - 2]).ok()?;
    if line.starts_with("MSG ") || line.starts_with("HMSG ") {
        let total: usize = line.split_whitespace().last()?.parse().ok()?;
        let len = line_end + total + 2;
        (buf.len() >= len).then_some(len)
    } else {
        Some(line_end)
    }
}

/// A publish acknowledgement (of `stream`, when given).
fn is_pub_ack(frame: &[u8], stream: Option<&str>) -> bool {
    if !frame.starts_with(b"MSG ") {
        return false;
    }
    let Some(body) = frame.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let body = &frame[body + 2..];
    match stream {
        None => body.starts_with(b"{\"stream\":"),
        Some(s) => body.starts_with(format!("{{\"stream\":\"{s}\"").as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_delimited() {
        assert_eq!(frame_len(b"PING\r\n"), Some(6));
        assert_eq!(frame_len(b"MSG a 1 3\r\nabc\r\nPING"), Some(16));
        assert_eq!(frame_len(b"MSG a 1 3\r\nab"), None);
        assert_eq!(frame_len(b"HMSG a 1 2 5\r\nhhabc\r\n"), Some(21));
        let ack = b"MSG _INBOX.x 1 20\r\n{\"stream\":\"S\",\"seq\":1}\r\n";
        assert!(is_pub_ack(ack, None));
        assert!(is_pub_ack(ack, Some("S")));
        assert!(!is_pub_ack(ack, Some("KV_other")));
        assert!(!is_pub_ack(b"MSG _INBOX.x 1 2\r\n{}\r\n", None));
    }
}
