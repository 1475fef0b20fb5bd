//! A write-coalescing (and peek-buffering) wrapper for accepted plain-TCP streams.
//!
//! Pingora writes a response's header and (small) body with separate writes and flushes at the
//! end; unbuffered, that is two `send` calls — and two wake-ups of the client — per response.
//! Pingora's own listener buffers writes (1460 bytes) for this reason, but that buffering is
//! crate-private, and its listener keeps a ~35 KiB future per connection (see `server`). This
//! wrapper keeps writes in a small buffer until Pingora flushes, or the buffer would overflow.
//!
//! Reading is buffered ahead for the accept loop, which waits here for each request head
//! ([`Coalesced::first_byte`], [`Coalesced::fill_head`]) before Pingora parses it: the whole
//! head is then in the buffer, so the head arrives under one deadline of ours
//! (`client_header_timeout`) instead of Pingora's per-read timeout, and waiting costs no extra
//! system call (one `recv` usually brings the whole head). Pingora's reads drain the buffer
//! first. The buffer is freed once drained, so an idle connection holds none. Everything else
//! Pingora asks of a stream (digests, peer address, ids) passes through.

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, IO,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes before a write goes straight through: one TCP segment on loopback or
/// ethernet, like Pingora's own default.
const CAPACITY: usize = 1460;

/// Bytes asked for by one read-ahead `recv`.
const READ_AHEAD: usize = 4096;

/// The largest request head accepted (request line and headers): nginx's default
/// `large_client_header_buffers` is 4 × 8 KiB; twice that is generous for cookies and tokens.
pub(crate) const HEAD_LIMIT: usize = 64 * 1024;

/// What [`Coalesced::fill_head`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// A complete request head is buffered.
    Complete,
    /// [`HEAD_LIMIT`] bytes are buffered and the head has not ended.
    TooLarge,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Coalesced<S> {
    inner: S,
    buf: Vec<u8>,
    /// Read ahead, not yet consumed.
    rbuf: Vec<u8>,
    rpos: usize,
    /// How far `fill_head` has looked for the end of the head (relative to `rpos`).
    scanned: usize,
}

impl<S> Coalesced<S> {
    pub(crate) fn new(inner: S) -> Self {
        Coalesced {
            inner,
            buf: Vec::new(),
            rbuf: Vec::new(),
            rpos: 0,
            scanned: 0,
        }
    }

    /// Bytes read ahead and not consumed yet.
    pub(crate) fn buffered(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    /// Whether the buffered bytes hold a complete request head: an empty line after something
    /// other than the empty lines a client may send before a request (RFC 9112 §2.2). Bare LF
    /// line ends count too, as the parser accepts them. Scans each byte once.
    fn head_complete(&mut self) -> bool {
        let data = &self.rbuf[self.rpos..];
        let Some(start) = data.iter().position(|b| *b != b'\r' && *b != b'\n') else {
            return false;
        };
        let from = self.scanned.max(start);
        for i in from..data.len() {
            if data[i] == b'\n' {
                match (data.get(i + 1), data.get(i + 2)) {
                    (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => return true,
                    _ => {}
                }
            }
        }
        self.scanned = data.len().saturating_sub(2).max(start);
        false
    }
}

impl<S: AsyncRead + Unpin> Coalesced<S> {
    /// Append what the next `recv` brings (up to [`READ_AHEAD`] bytes); 0 at end of stream.
    /// The bytes land in a stack buffer during the poll and are copied once into `rbuf`: a
    /// connection waiting for its next request holds no buffer at all (10k idle keep-alive
    /// clients would otherwise hold 40 MiB of empty read buffers).
    async fn read_ahead(&mut self) -> io::Result<usize> {
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        std::future::poll_fn(|cx| {
            let mut chunk = [0u8; READ_AHEAD];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    self.rbuf.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(rb.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Wait for the first byte of the next request. `false`: the peer closed (or reset) the
    /// connection first.
    pub(crate) async fn first_byte(&mut self) -> bool {
        while self.buffered() == 0 {
            match self.read_ahead().await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    }

    /// Read until a whole request head is buffered, or [`HEAD_LIMIT`] bytes are. An error when
    /// the peer closes or breaks the connection before the head is complete.
    pub(crate) async fn fill_head(&mut self) -> io::Result<Head> {
        loop {
            if self.head_complete() {
                return Ok(Head::Complete);
            }
            if self.buffered() >= HEAD_LIMIT {
                return Ok(Head::TooLarge);
            }
            if self.read_ahead().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a request head",
                ));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Write out the buffer; Ready(Ok) when it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection closed while writing",
                    )))
                }
                Poll::Ready(Ok(n)) => {
                    self.buf.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.rpos < this.rbuf.len() {
            let n = buf.remaining().min(this.rbuf.len() - this.rpos);
            buf.put_slice(&this.rbuf[this.rpos..this.rpos + n]);
            this.rpos += n;
            this.scanned = 0;
            if this.rpos == this.rbuf.len() {
                // Drained: free it, an idle connection should hold no buffer.
                this.rbuf = Vec::new();
                this.rpos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() <= CAPACITY {
            this.buf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        // Too big to hold: send what is buffered, then this write directly.
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if data.len() <= CAPACITY {
            this.buf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[async_trait]
impl<S: IO> Shutdown for Coalesced<S> {
    async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.flush().await;
        self.inner.shutdown().await;
    }
}

impl<S: IO> UniqueID for Coalesced<S> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl<S: IO> Ssl for Coalesced<S> {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl<S: IO> GetTimingDigest for Coalesced<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl<S: IO> GetProxyDigest for Coalesced<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl<S: IO> GetSocketDigest for Coalesced<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl<S: IO> Peek for Coalesced<S> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if !self.first_byte().await {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let n = buf.len().min(self.buffered());
        buf[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_peek_reads_ahead_and_the_next_reads_drain_it() {
        // Peek needs a Pingora stream: a real loopback socket pair.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            c
        });
        let (srv, _) = listener.accept().await.unwrap();
        let _c = client.await.unwrap();
        let stream: pingora::protocols::l4::stream::Stream = srv.into();
        let mut w = Coalesced::new(stream);
        let mut one = [0u8; 1];
        assert!(w.try_peek(&mut one).await.unwrap());
        assert_eq!(&one, b"G");
        let mut all = [0u8; 18];
        w.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");
        assert!(w.rbuf.is_empty(), "freed once drained");
    }

    #[tokio::test]
    async fn small_writes_wait_for_flush_and_big_ones_pass_through() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        w.write_all(b"hello").await.unwrap();
        assert_eq!(w.buf.len(), 24, "held until flush");
        w.flush().await.unwrap();
        let mut got = [0u8; 24];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\nhello");
        let big = vec![7u8; 10_000];
        w.write_all(b"x").await.unwrap();
        w.write_all(&big).await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; 10_001];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], b'x');
        assert!(got[1..].iter().all(|v| *v == 7));
    }

    #[tokio::test]
    async fn fill_head_waits_for_the_empty_line_however_the_head_is_split() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        let writer = tokio::spawn(async move {
            for part in [
                &b"\r\n\r\nGET / HT"[..],
                b"TP/1.1\r\nHost: x\r",
                b"\n\r",
                b"\nbody",
            ] {
                b.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            b
        });
        assert_eq!(w.fill_head().await.unwrap(), Head::Complete);
        drop(writer.await.unwrap());
        let mut all = String::new();
        w.read_to_string(&mut all).await.ok();
        assert!(
            all.starts_with("\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            "{all:?}"
        );
    }

    #[tokio::test]
    async fn fill_head_accepts_bare_lf_and_refuses_endless_heads() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        b.write_all(b"GET / HTTP/1.1\nHost: x\n\n").await.unwrap();
        assert_eq!(w.fill_head().await.unwrap(), Head::Complete);

        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let line = vec![b'x'; 1000];
        tokio::spawn(async move {
            for _ in 0..100 {
                if b.write_all(&line).await.is_err() {
                    break;
                }
            }
            b
        });
        assert_eq!(w.fill_head().await.unwrap(), Head::TooLarge);
        assert!(w.buffered() >= HEAD_LIMIT);
    }

    #[tokio::test]
    async fn a_peer_that_leaves_mid_head_is_an_error_and_an_idle_close_is_not() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesced::new(a);
        b.write_all(b"GET / HT").await.unwrap();
        drop(b);
        assert!(w.first_byte().await);
        assert!(w.fill_head().await.is_err());
        let (a, b) = tokio::io::duplex(1024);
        drop(b);
        assert!(!Coalesced::new(a).first_byte().await);
    }
}
