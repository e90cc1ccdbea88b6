//! Bytes between a TCP socket and an HTTP/2 stream, both ways, with h2's
//! flow control (capacity reserved before sending, released after
//! writing) so neither side buffers without bound.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK: usize = 256 * 1024;

/// Relays until both directions end. Returns (bytes TCP → h2, h2 → TCP).
pub async fn relay(tcp: TcpStream, tx: SendStream<Bytes>, rx: RecvStream) -> (u64, u64) {
    let (rd, wr) = tcp.into_split();
    let up = tcp_to_h2(rd, tx);
    let down = h2_to_tcp(rx, wr);
    let (a, b) = tokio::join!(up, down);
    (a, b)
}

async fn tcp_to_h2(mut rd: tokio::net::tcp::OwnedReadHalf, mut tx: SendStream<Bytes>) -> u64 {
    let mut buf = bytes::BytesMut::with_capacity(CHUNK);
    let mut total = 0u64;
    loop {
        if buf.capacity() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        let n = match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send_data(Bytes::new(), true);
                return total;
            }
            Ok(n) => n,
        };
        total += n as u64;
        // No copy: the bytes read go to h2 as they are.
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            tx.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(c)) if c > 0 => c,
                Some(Ok(_)) => continue,
                _ => return total,
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            if tx.send_data(part, false).is_err() {
                return total;
            }
        }
    }
}

async fn h2_to_tcp(mut rx: RecvStream, mut wr: tokio::net::tcp::OwnedWriteHalf) -> u64 {
    let mut total = 0u64;
    while let Some(data) = rx.data().await {
        let Ok(data) = data else { break };
        let _ = rx.flow_control().release_capacity(data.len());
        total += data.len() as u64;
        if wr.write_all(&data).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    total
}
