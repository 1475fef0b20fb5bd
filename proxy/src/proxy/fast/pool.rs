//! The fast path's idle upstream connections: one LIFO list per worker thread, no locks, no
//! task per connection.
//!
//! Each worker runs its own current-thread runtime (nginx's model, `runtime`), so a request
//! and the connections it may reuse live on the same thread: a `thread_local` list is the
//! whole pool. The most recently used connection is reused first (its TCP state is warm, and
//! the app's least recently used ones are left to time out). Pingora's pool keeps an
//! `Arc<Mutex>`, a oneshot channel and an LRU node per idle connection and a task watching
//! each one; here an idle connection is its socket, its key and its deadline.
//!
//! A connection is never handed out when it is past `idle_timeout`, or when the app closed it
//! (or sent something unasked) while it idled. That check costs no system call in the usual
//! case: tokio clears a socket's read readiness when a read returns less than asked, which is
//! how the last read of a response ends, so a socket that is read-ready again got a FIN or
//! bytes since, and only then is it read to tell. A sweep (a task per thread, while the list is
//! not empty) closes expired connections and those the app closed, at least once per
//! [`SWEEP`], so sockets do not linger in `CLOSE_WAIT` (the same bound as Pingora's pool with
//! third_party/PATCHES.md 2).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The longest an idle connection the app closed stays open here.
const SWEEP: Duration = Duration::from_secs(1);

/// Idle connections kept per worker thread (set from the open-file budget at start).
static CAPACITY: AtomicUsize = AtomicUsize::new(128);

/// Set how many idle connections each worker thread keeps.
pub(crate) fn set_capacity(n: usize) {
    CAPACITY.store(n.max(1), Ordering::Relaxed);
}

/// Reuse key: the pool's epoch and the instance (`Switchyard::upstream_peer`'s `group_key`),
/// so a connection opened before a drain is never reused, and the address it was opened to (an
/// instance's name may resolve elsewhere now).
pub(crate) type Key = (u64, SocketAddr);

struct Idle {
    key: Key,
    stream: TcpStream,
    until: Instant,
}

#[derive(Default)]
struct Pool {
    /// Oldest first.
    idle: VecDeque<Idle>,
    /// A sweep task is running on this thread.
    sweeping: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Whether an idle connection can be used: the app neither closed it nor sent anything.
fn usable(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match s.poll_read_ready(&mut cx) {
        // Nothing arrived since the response was read to its end.
        Poll::Pending => true,
        // Something did, or the readiness was left set by a read that filled its buffer:
        // look (a FIN reads 0, unasked bytes make it unusable too).
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
        Poll::Ready(Err(_)) => false,
    }
}

/// An idle connection for `key`, most recently used first.
pub(crate) fn take(key: Key) -> Option<TcpStream> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let now = Instant::now();
        while let Some(i) = p.idle.iter().rposition(|c| c.key == key) {
            let Some(c) = p.idle.remove(i) else {
                break;
            };
            if c.until > now && usable(&c.stream) {
                return Some(c.stream);
            }
            // Dropped: closed.
        }
        None
    })
}

/// Keep `stream` for reuse by `key` until `idle` has passed.
pub(crate) fn put(key: Key, stream: TcpStream, idle: Duration) {
    if idle.is_zero() {
        return;
    }
    let start_sweep = POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.idle.len() >= CAPACITY.load(Ordering::Relaxed) {
            // Full: the least recently used one makes room.
            p.idle.pop_front();
        }
        p.idle.push_back(Idle {
            key,
            stream,
            until: Instant::now() + idle,
        });
        !std::mem::replace(&mut p.sweeping, true)
    });
    if start_sweep {
        tokio::spawn(sweep());
    }
}

/// Close what expired or what the app closed, until the list is empty. Runs on the thread
/// whose list it sweeps: the workers' runtimes are current-thread.
async fn sweep() {
    loop {
        let next = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let now = Instant::now();
            p.idle.retain(|c| c.until > now && usable(&c.stream));
            if p.idle.is_empty() {
                p.sweeping = false;
                return None;
            }
            let soonest = p.idle.iter().map(|c| c.until).min().unwrap_or(now + SWEEP);
            Some(soonest.min(now + SWEEP))
        });
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return,
        }
    }
}

/// Idle connections on this thread (tests).
#[cfg(test)]
pub(crate) fn idle_here() -> usize {
    POOL.with(|p| p.borrow().idle.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn k(n: u64) -> Key {
        (n, SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reuse_is_lifo_by_key_and_skips_closed_and_expired() {
        let (a, mut a_peer) = pair().await;
        let (b, _b_peer) = pair().await;
        let (c, _c_peer) = pair().await;
        let b_port = b.local_addr().unwrap();
        let a_port = a.local_addr().unwrap();
        put(k(1), a, Duration::from_secs(60));
        put(k(1), b, Duration::from_secs(60));
        put(k(2), c, Duration::from_millis(1));
        assert_eq!(idle_here(), 3);
        // Most recent first, and only for its key.
        let got = take(k(1)).unwrap();
        assert_eq!(got.local_addr().unwrap(), b_port);
        let a = take(k(1)).unwrap();
        assert_eq!(a.local_addr().unwrap(), a_port);
        assert!(take(k(1)).is_none());
        // The same instance at another address: not reused.
        put(k(1), got, Duration::from_secs(60));
        assert!(take((1, SocketAddr::from(([127, 0, 0, 2], 8080)))).is_none());
        let got = take(k(1)).unwrap();
        // The app closes `a` while it idles: it is never handed out again, and closed here.
        a_peer.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), a.readable())
            .await
            .expect("the FIN arrives")
            .unwrap();
        put(k(1), a, Duration::from_secs(60));
        assert!(
            take(k(1)).is_none(),
            "a connection the app closed was handed out"
        );
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), a_peer.read(&mut buf))
            .await
            .expect("closed by the pool")
            .unwrap();
        assert_eq!(n, 0);
        drop(got);
        // Expired: `take` itself refuses it (no await from `put` to `take`, so the sweep
        // cannot have run in between).
        let (d, _d_peer) = pair().await;
        put(k(3), d, Duration::from_millis(1));
        let until = std::time::Instant::now() + Duration::from_millis(3);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        assert_eq!(idle_here(), 2, "c and d still listed");
        assert!(take(k(3)).is_none(), "an expired connection was handed out");
        assert!(take(k(2)).is_none());
        assert_eq!(idle_here(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_sweep_closes_what_the_app_closed_and_what_expired() {
        let (a, mut a_peer) = pair().await;
        let (b, mut b_peer) = pair().await;
        put(k(7), a, Duration::from_secs(60));
        put(k(8), b, Duration::from_millis(200));
        a_peer.shutdown().await.unwrap();
        let mut buf = [0u8; 1];
        // Both see their end closed within the sweep interval, without any take.
        for peer in [&mut a_peer, &mut b_peer] {
            let n = tokio::time::timeout(SWEEP * 3, peer.read(&mut buf))
                .await
                .expect("closed by the sweep")
                .unwrap();
            assert_eq!(n, 0);
        }
        assert_eq!(idle_here(), 0);
    }
}
