//! Real etcd processes for the etcd backend's tests: one member or a cluster of several, on
//! free loopback ports, in a temporary directory; killed (and the directory removed) on drop.
//!
//! Uses the `etcd` on `PATH` (Debian's `etcd-server`), or `$ETCD_BIN`. A missing etcd fails
//! the test with a message saying what to install: these tests never skip.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long etcd may take to start or to elect a leader on a small, busy machine.
const READY_BOUND: Duration = Duration::from_secs(60);

/// A free loopback port: bound, read, released (etcd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return path.into();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not installed (no `etcd` on PATH, no $ETCD_BIN): the etcd backend's \
                 tests need a real etcd. Install it with `apt-get install etcd-server` \
                 (or run .ci/run, which installs it)."
            )
        })
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of real processes.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one answers with a leader.
    pub async fn start(size: usize) -> EtcdCluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("distributed-lock-etcd-{unique}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory for etcd");
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            token: format!("dl-test-{unique}"),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let binary = etcd_binary();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", member.name)))
            .expect("etcd log file");
        let child = Command::new(&binary)
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}. Install etcd with `apt-get install etcd-server`.",
                    binary.display()
                )
            });
        self.members[i].child = Some(child);
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its data directory, and waits until the cluster answers.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready().await;
    }

    /// Starts every stopped member, and waits until the cluster answers.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_ready().await;
    }

    /// The index of the member that is the raft leader now.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            for i in self.running() {
                if let Ok(Ok(mut client)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    etcd_client::Client::connect([self.endpoint(i)], None),
                )
                .await
                    && let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_secs(1), client.status()).await
                    && let Some(header) = status.header()
                    && status.leader() == header.member_id()
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {READY_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect()
    }

    /// Waits until every running member serves a linearizable read (so it knows a leader).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_BOUND;
        for i in self.running() {
            loop {
                if let Some(child) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(
                        self.dir.join(format!("{}.log", self.members[i].name)),
                    )
                    .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    panic!(
                        "etcd member {i} exited ({status}); last log lines:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                if answers(&self.endpoint(i)).await {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} did not answer within {READY_BOUND:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// True when the member at `endpoint` serves a linearizable read.
async fn answers(endpoint: &str) -> bool {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_require_leader(true);
    let attempt = async {
        let mut client = etcd_client::Client::connect([endpoint], Some(options))
            .await
            .ok()?;
        client.get("readiness", None).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
