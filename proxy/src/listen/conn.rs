//! An accepted client connection as Pingora sees it: writes coalesced, reads framed.
//!
//! **Writes.** Pingora writes a response's header and (small) body with separate writes and
//! flushes at the end; unbuffered, that is two `send` calls — and two wake-ups of the client —
//! per response. Writes wait in a small buffer until Pingora flushes, or the buffer would
//! overflow.
//!
//! **Reads.** The accept loop reads each request head ahead into this connection's buffer
//! ([`Conn::first_byte`], [`Conn::fill_head`]) under one deadline of its own
//! (`client_header_timeout`), checks it (`head`), and then declares its framing
//! ([`Conn::begin`]). From then on Pingora's reads are handed exactly that request: its head,
//! then its body (`Content-Length` bytes, or a chunked body followed by `chunked`), and nothing
//! after it. Bytes that follow — the next pipelined requests — stay here, up to
//! [`QUEUE_LIMIT`], and the accept loop hands them to the next request in order. Pingora
//! therefore never sees a pipelined request while it serves the previous one (it would drop or
//! refuse it), and a malformed chunked body is an error before the app sees the bytes that
//! break its framing. An upgraded request (WebSocket) turns the connection into a tunnel: after
//! its head every byte passes.
//!
//! Waiting costs no extra system call (one `recv` usually brings the whole head), and a
//! connection waiting for its next request holds no buffer: reads land in a stack buffer during
//! the poll and are copied once. Everything else Pingora asks of a stream (digests, peer
//! address, ids) passes through.

use super::chunked::Chunked;
use super::head::{self, Body};
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
const READ_AHEAD: usize = 8192;

/// The largest request head accepted (request line and headers): nginx's default
/// `large_client_header_buffers` is 4 × 8 KiB; twice that is generous for cookies and tokens.
pub(crate) const HEAD_LIMIT: usize = 64 * 1024;

/// Bytes of pipelined requests kept while the current one is served. Beyond it the connection
/// stops reading (TCP flow control holds the client back).
pub(crate) const QUEUE_LIMIT: usize = 64 * 1024;

/// Bytes of a chunked request body read ahead, before the request is forwarded, to refuse one
/// over `client_max_body_size` before the app sees any of it (413). A larger body is forwarded
/// as it streams and cut where it crosses the limit. (nginx buffers the whole body by default;
/// this bounds what one connection holds.)
pub(crate) const PREBUFFER: usize = 64 * 1024;

/// A client that sends nothing more for this long while its chunked body is read ahead has
/// its request forwarded (a streaming upload, or one waiting for an early answer).
pub(crate) const PREBUFFER_PAUSE: Duration = Duration::from_millis(200);

/// A request body over `client_max_body_size` (the error inside the `io::Error` the connection
/// reports, so the request path can answer 413).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body is larger than client_max_body_size ({0} bytes)")]
pub(crate) struct BodyTooLarge(pub(crate) u64);

/// What [`Conn::prebuffer_chunked`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prebuffered {
    /// Complete within the limit, or too long to hold (then checked as it streams).
    Forward,
    /// Announces more than the limit.
    TooLarge,
    /// Its framing is broken.
    Malformed(&'static str),
}

/// What [`Conn::fill_head`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// A complete request head is buffered.
    Complete,
    /// [`HEAD_LIMIT`] bytes are buffered and the head has not ended.
    TooLarge,
}

/// Where the connection is in the current request, as far as Pingora's reads go.
#[derive(Debug, Clone)]
enum Phase {
    /// Between requests: the accept loop reads; reads pass through.
    Between,
    /// The head: this many bytes left to hand out, then `next`.
    Head { left: usize, next: Next },
    /// A body of this many bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunked),
    /// The request is complete: nothing more is handed out (pipelined bytes wait).
    Complete,
    /// No longer HTTP (an upgrade): every byte passes.
    Tunnel,
}

/// What follows a head.
#[derive(Debug, Clone, Copy)]
enum Next {
    Body(Body),
    Tunnel,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Conn<S> {
    inner: S,
    /// Writes waiting for a flush.
    wbuf: Vec<u8>,
    /// Read ahead, not yet handed out.
    rbuf: Vec<u8>,
    rpos: usize,
    /// How far `fill_head` has looked for the end of the head (relative to `rpos`).
    scanned: usize,
    phase: Phase,
    /// The peer closed its side after sending requests that are still queued here: they are
    /// answered first; the last one sees the end of the stream (see `poll_queue`).
    eof: bool,
    /// `client_max_body_size` for the current request (0 = unlimited).
    body_limit: u64,
}

impl<S> Conn<S> {
    pub(crate) fn new(inner: S) -> Self {
        Conn {
            inner,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            rpos: 0,
            scanned: 0,
            phase: Phase::Between,
            eof: false,
            body_limit: 0,
        }
    }

    /// Bytes read ahead and not handed out yet.
    pub(crate) fn buffered(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    /// The bytes read ahead (for the head check).
    pub(crate) fn unread(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    /// Declare the request whose head is buffered: from now on Pingora reads exactly it. A
    /// chunked body that grows past `body_limit` (0 = unlimited) is cut there with
    /// [`BodyTooLarge`].
    pub(crate) fn begin(&mut self, h: &head::Head, body_limit: u64) {
        self.body_limit = body_limit;
        self.consume(h.skip);
        let next = if h.upgrade {
            Next::Tunnel
        } else {
            Next::Body(h.body)
        };
        self.phase = Phase::Head { left: h.len, next };
    }

    /// Take the request head `h` (and the empty lines before it) out of the buffer for the fast
    /// path (`proxy::fast`), which forwards a request without a body itself: the request is then
    /// complete here, and what follows it stays buffered as the next one. Without pipelined
    /// bytes after it (the usual case) the buffer itself is taken, not copied.
    pub(crate) fn take_head(&mut self, h: &head::Head) -> Vec<u8> {
        let n = h.skip + h.len;
        let head = if self.rpos == 0 && n == self.rbuf.len() {
            self.scanned = 0;
            std::mem::take(&mut self.rbuf)
        } else {
            let v = self.rbuf[self.rpos..self.rpos + n].to_vec();
            self.consume(n);
            v
        };
        self.phase = Phase::Complete;
        head
    }

    /// Undo [`Self::take_head`]: the fast path declined the request, Pingora reads it.
    pub(crate) fn put_back(&mut self, mut head: Vec<u8>) {
        if self.buffered() > 0 {
            head.extend_from_slice(&self.rbuf[self.rpos..]);
        }
        self.rbuf = head;
        self.rpos = 0;
        self.scanned = 0;
        self.phase = Phase::Between;
    }

    /// Whether Pingora read the whole current request (so the buffered bytes, if any, are the
    /// next one), and the connection can serve another.
    pub(crate) fn request_complete(&mut self) -> bool {
        let done = matches!(self.phase, Phase::Complete);
        if done {
            self.phase = Phase::Between;
        }
        done
    }

    /// Hand out (mark consumed) `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.rpos += n;
        self.scanned = 0;
        if self.rpos == self.rbuf.len() {
            // Drained: free it, an idle connection should hold no buffer.
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
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

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Read what the next `recv` brings (up to [`READ_AHEAD`] bytes) into the buffer; 0 at end
    /// of stream. The bytes land in a stack buffer during the poll and are copied once: a
    /// connection waiting for its next request holds no buffer at all (10k idle keep-alive
    /// clients would otherwise hold 80 MiB of empty read buffers).
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
        // Not zeroed: the socket writes what is read, and only that is looked at. Zeroing 8 KiB
        // on every poll (Pending ones too) was a quarter of all the instructions of a
        // proxied request (`costbench`, issue 14).
        let mut chunk = [const { std::mem::MaybeUninit::<u8>::uninit() }; READ_AHEAD];
        let mut rb = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                if self.rpos > 0 {
                    self.rbuf.drain(..self.rpos);
                    self.rpos = 0;
                }
                self.rbuf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(rb.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    async fn read_ahead(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_ahead(cx)).await
    }

    /// Wait for the first byte of the next request. `false`: the peer closed (or reset) the
    /// connection first.
    pub(crate) async fn first_byte(&mut self) -> bool {
        while self.buffered() == 0 {
            if self.eof {
                return false;
            }
            match self.read_ahead().await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    }

    /// Read until at least `n` bytes are buffered; false when the peer closed or broke the
    /// connection first.
    pub(crate) async fn fill(&mut self, n: usize) -> bool {
        while self.buffered() < n {
            if self.eof || !matches!(self.read_ahead().await, Ok(k) if k > 0) {
                return false;
            }
        }
        true
    }

    /// The stream underneath, for draining a connection that is being closed.
    pub(crate) fn raw(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Read until a whole request head is buffered, or [`HEAD_LIMIT`] bytes are. An error when
    /// the peer closes or breaks the connection before the head is complete.
    pub(crate) async fn fill_head(&mut self) -> io::Result<Fill> {
        loop {
            if self.head_complete() {
                return Ok(Fill::Complete);
            }
            if self.buffered() >= HEAD_LIMIT {
                return Ok(Fill::TooLarge);
            }
            if self.eof || self.read_ahead().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a request head",
                ));
            }
        }
    }

    /// Read the chunked body of the request whose head is buffered (`h`, not begun yet) ahead:
    /// until it is complete, announces more than `limit` bytes, or [`PREBUFFER`] bytes of it
    /// are here, or the client pauses sending for [`PREBUFFER_PAUSE`] (or ends the stream; the
    /// caller bounds the whole with a deadline). Each byte is looked at once.
    pub(crate) async fn prebuffer_chunked(&mut self, h: &head::Head, limit: u64) -> Prebuffered {
        let at = h.skip + h.len;
        let mut t = Chunked::default();
        let mut seen = 0;
        loop {
            let body = &self.rbuf[self.rpos + at..];
            let n = match t.advance(&body[seen..]) {
                Ok(n) => n,
                Err(m) => return Prebuffered::Malformed(m.0),
            };
            seen += n;
            if limit > 0 && t.declared() > limit {
                return Prebuffered::TooLarge;
            }
            if t.done() || body.len() >= PREBUFFER || self.eof {
                return Prebuffered::Forward;
            }
            match tokio::time::timeout(PREBUFFER_PAUSE, self.read_ahead()).await {
                Ok(Ok(k)) if k > 0 => {}
                // The end of the stream, an error, or a pause: forward what is here.
                _ => return Prebuffered::Forward,
            }
        }
    }

    /// Make sure something is buffered for the current request's body: `Ready(Ok(false))` at
    /// end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.buffered() > 0 {
            return Poll::Ready(Ok(true));
        }
        match self.poll_read_ahead(cx) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n > 0)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The request is complete and Pingora reads anyway (it watches for the client going
    /// away): keep what arrives — pipelined requests — up to [`QUEUE_LIMIT`], and report the end
    /// of the stream only when nothing is queued. So a client that closes (or half-closes) its
    /// side is gone for the request in flight when nothing follows it — nginx's client abort
    /// (499), whether the FIN was read before or after that request began — while requests it
    /// pipelined before its last one are all answered.
    fn poll_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.eof {
                // Read earlier, while a request was queued: now it is this request's turn.
                return if self.buffered() == 0 {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            if self.buffered() >= QUEUE_LIMIT {
                return Poll::Pending;
            }
            match self.poll_read_ahead(cx) {
                Poll::Ready(Ok(0)) => {
                    if self.buffered() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    self.eof = true;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// For the fast path while a request is in flight: ready when the client has closed (or
    /// broken) its connection with no further request queued — gone, nginx's 499 — as Pingora
    /// sees it through [`Self::poll_queue`]. Pipelined requests are kept meanwhile.
    pub(crate) fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.poll_queue(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    }

    /// Copy up to `n` buffered bytes into `buf` and consume them.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>, n: usize) -> usize {
        let n = n.min(buf.remaining()).min(self.buffered());
        buf.put_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.consume(n);
        n
    }

    /// Pass through: what is buffered first, then the stream.
    fn poll_pass(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.buffered() > 0 {
            self.hand_out(buf, usize::MAX);
            return Poll::Ready(Ok(()));
        }
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }

    /// After a head: where the request continues.
    fn after_head(next: Next) -> Phase {
        match next {
            Next::Tunnel => Phase::Tunnel,
            Next::Body(Body::None) | Next::Body(Body::Length(0)) => Phase::Complete,
            Next::Body(Body::Length(n)) => Phase::Length(n),
            Next::Body(Body::Chunked) => Phase::Chunked(Chunked::default()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Conn<S> {
    /// Write out the buffer; Ready(Ok) when it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection closed while writing",
                    )))
                }
                Poll::Ready(Ok(n)) => {
                    self.wbuf.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.phase {
                Phase::Between | Phase::Tunnel => return this.poll_pass(cx, buf),
                Phase::Head { left, next } => {
                    let (left, next) = (*left, *next);
                    // The whole head is buffered before `begin`.
                    let n = this.hand_out(buf, left);
                    this.phase = if n == left {
                        Self::after_head(next)
                    } else {
                        Phase::Head {
                            left: left - n,
                            next,
                        }
                    };
                    return Poll::Ready(Ok(()));
                }
                Phase::Length(left) => {
                    let left = *left;
                    match this.poll_fill(cx) {
                        Poll::Ready(Ok(true)) => {}
                        // Short body: Pingora sees the end of the stream.
                        Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                    let n = this.hand_out(buf, usize::try_from(left).unwrap_or(usize::MAX));
                    let rest = left - n as u64;
                    this.phase = if rest == 0 {
                        Phase::Complete
                    } else {
                        Phase::Length(rest)
                    };
                    return Poll::Ready(Ok(()));
                }
                Phase::Chunked(_) => {
                    match this.poll_fill(cx) {
                        Poll::Ready(Ok(true)) => {}
                        Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                    let avail = this.buffered().min(buf.remaining());
                    let Phase::Chunked(t) = &mut this.phase else {
                        continue;
                    };
                    let n = t
                        .advance(&this.rbuf[this.rpos..this.rpos + avail])
                        .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m.0))?;
                    if this.body_limit > 0 && t.declared() > this.body_limit {
                        // Cut before the chunk that crosses the limit reaches the app.
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            BodyTooLarge(this.body_limit),
                        )));
                    }
                    let done = t.done();
                    this.hand_out(buf, n);
                    if done {
                        this.phase = Phase::Complete;
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Complete => return this.poll_queue(cx),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.wbuf.len() + data.len() <= CAPACITY {
            this.wbuf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        // Too big to hold: send what is buffered, then this write directly.
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if data.len() <= CAPACITY {
            this.wbuf.extend_from_slice(data);
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
impl<S: IO> Shutdown for Conn<S> {
    async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.flush().await;
        self.inner.shutdown().await;
    }
}

impl<S: IO> UniqueID for Conn<S> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl<S: IO> Ssl for Conn<S> {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl<S: IO> GetTimingDigest for Conn<S> {
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

impl<S: IO> GetProxyDigest for Conn<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl<S: IO> GetSocketDigest for Conn<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl<S: IO> Peek for Conn<S> {
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
mod tests;
