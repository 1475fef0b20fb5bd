//! Real etcd for fleet tests (Debian's `etcd-server`): a single node or a cluster on loopback
//! ports picked at run time, data in a temporary directory; members can be killed and started
//! again. And [`Relay`], a TCP relay that can cut one proxy's link to etcd.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    peer_port: u16,
    data_dir: std::path::PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
    initial_cluster: String,
}

impl Etcd {
    /// Start `n` members and wait until the cluster answers (bounded: 30 s).
    pub async fn start(n: usize) -> Etcd {
        assert!(
            which("etcd"),
            "the fleet tests need etcd (Debian: apt-get install etcd-server); .ci/run installs it"
        );
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: crate::free_port(),
                peer_port: crate::free_port(),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            _dir: dir,
            initial_cluster,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_healthy(i).await;
        }
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "switchyard-test"])
            // Fast elections: a killed leader is replaced within about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url()).collect()
    }

    /// Kill member `i` (SIGKILL: no goodbye to the cluster).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data directory and ports; wait until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// A single-node cluster lost for good: member `i` killed, its data deleted, started
    /// again empty on the same port (revisions start over).
    pub async fn wipe_and_restart(&mut self, i: usize) {
        self.kill(i);
        let _ = std::fs::remove_dir_all(&self.members[i].data_dir);
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Wait until member `i` reports itself healthy (bounded: 30 s). A member that exited
    /// (its ports not free yet right after a kill) is started again.
    pub async fn wait_healthy(&mut self, i: usize) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.members[i].client_port).into();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self.members[i]
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.spawn(i);
            }
            if let Some(r) = probe(addr, "/health").await {
                if r.status == 200 && r.text().contains("true") {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "etcd member {} not healthy within 30 s",
                self.members[i].name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the member that is the raft leader now, if one answers as such.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let addr: SocketAddr = ([127, 0, 0, 1], m.client_port).into();
            if let Some(r) = probe(addr, "/metrics").await {
                if r.text().lines().any(|l| l == "etcd_server_is_leader 1") {
                    return Some(i);
                }
            }
        }
        None
    }
}

impl Member {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// GET on etcd's HTTP side, bounded to a second (a stopped member never answers).
async fn probe(addr: SocketAddr, path: &str) -> Option<crate::Reply> {
    tokio::time::timeout(
        Duration::from_secs(1),
        crate::request(addr, "GET", path, &[], bytes::Bytes::new()),
    )
    .await
    .ok()?
    .ok()
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// A TCP relay in front of an etcd member: one proxy's link, which a test can cut (every open
/// connection closed, new ones closed at once) and restore.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(tx);
        let task = {
            let (cut, generation) = (cut.clone(), generation.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    // Subscribed before looking at `cut`: a cut right after this is seen.
                    let mut cuts = generation.subscribe();
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(to).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            })
        };
        Relay {
            addr,
            cut,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close every relayed connection and refuse new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
