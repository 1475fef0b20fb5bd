//! A write-coalescing (and peek-buffering) wrapper for accepted plain-TCP streams.
//!
//! Pingora writes a response's header and (small) body with separate writes and flushes at the
//! end; unbuffered, that is two `send` calls — and two wake-ups of the client — per response.
//! Pingora's own listener buffers writes (1460 bytes) for this reason, but that buffering is
//! crate-private, and its listener keeps a ~35 KiB future per connection (see `server`). This
//! wrapper keeps writes in a small buffer until Pingora flushes, or the buffer would overflow.
//!
//! Waiting for the next request on a keep-alive connection is done with [`Peek`]; here a peek
//! reads what has arrived (one `recv` of up to 1 KiB — usually the whole request head) into a
//! buffer that the following reads drain, so waiting costs no extra system call. The buffer is
//! freed once drained, so an idle connection holds none. Everything else Pingora asks of a
//! stream (digests, peer address, ids) passes through.

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

/// Bytes read ahead by a peek.
const PEEK_READ: usize = 1024;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Coalesced<S> {
    inner: S,
    buf: Vec<u8>,
    /// Read ahead by `try_peek`, not yet consumed.
    rbuf: Vec<u8>,
    rpos: usize,
}

impl<S> Coalesced<S> {
    pub(crate) fn new(inner: S) -> Self {
        Coalesced {
            inner,
            buf: Vec::new(),
            rbuf: Vec::new(),
            rpos: 0,
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
        use tokio::io::AsyncReadExt;
        if self.rpos >= self.rbuf.len() {
            let mut ahead = vec![0u8; PEEK_READ];
            let n = self.inner.read(&mut ahead).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            ahead.truncate(n);
            self.rbuf = ahead;
            self.rpos = 0;
        }
        let n = buf.len().min(self.rbuf.len() - self.rpos);
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
}
