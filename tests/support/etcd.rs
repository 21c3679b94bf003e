//! Real etcd processes for the etcd backend's tests: one member or a cluster of several, on
//! free loopback ports, in a temporary directory; killed (and the directory removed) on drop.
//! Optionally with TLS (and client certificates) on the client URLs, and with etcd's
//! authentication on.
//!
//! Uses the `etcd` on `PATH` (Debian's `etcd-server`), or `$ETCD_BIN`. A missing etcd fails
//! the test with a message saying what to install: these tests never skip.

use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long etcd may take to start or to elect a leader on a small, busy machine.
const READY_BOUND: Duration = Duration::from_secs(60);

/// A free loopback port for etcd, from below the kernel's ephemeral range (32768 and up on
/// Linux), so that no outgoing connection can take it between this check and etcd's bind;
/// a counter keeps this process's tests apart, and the process id other test processes.
fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 20_000 + (std::process::id() as usize % 40) * 300;
    loop {
        let port = (base + NEXT.fetch_add(1, Ordering::Relaxed) % 300) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// A throwaway certificate authority (rcgen).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM), for whoever should trust it.
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses; the first is also its common
    /// name), signed by this CA: (certificate PEM, private key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// The PEM files of a TLS etcd: a CA, etcd's certificate for 127.0.0.1 and localhost, and
/// a client certificate, all in the cluster's directory. Peer URLs stay plain http.
pub struct EtcdPki {
    /// The CA that signed etcd's certificate and the client certificate.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdPki {
    fn write(dir: &Path) -> EtcdPki {
        let ca = Ca::new("etcd test CA");
        let (server_cert, server_key) = ca.issue(&["127.0.0.1", "localhost"]);
        let (client_cert, client_key) = ca.issue(&["leasehold-server"]);
        let file = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("PEM file");
            path
        };
        EtcdPki {
            ca: file("ca.pem", &ca.pem),
            client_cert: file("client.pem", &client_cert),
            client_key: file("client-key.pem", &client_key),
            server_cert: file("server.pem", &server_cert),
            server_key: file("server-key.pem", &server_key),
        }
    }

    /// etcd-client's TLS settings with the CA and the client certificate.
    fn options(&self) -> TlsOptions {
        let read = |path: &PathBuf| std::fs::read(path).expect("PEM file");
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ))
    }
}

/// An etcd cluster of real processes.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// Set for a cluster serving TLS to clients (with client certificates required).
    pub pki: Option<EtcdPki>,
    /// The root user's password, once authentication is on.
    root_password: Option<String>,
    /// Added to every disk sync of every member (see [`EtcdCluster::start_slow_disk`]).
    sync_delay: Option<Duration>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one answers with a leader.
    pub async fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, false).await
    }

    /// Starts `size` members that serve clients over TLS only and require a client
    /// certificate signed by the cluster's CA (`--client-cert-auth`).
    pub async fn start_tls(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, true).await
    }

    /// Starts `size` members whose disk syncs (`fsync`, `fdatasync`) each take `delay`
    /// longer, as on a slower disk: `strace` (which must be installed) injects the delay.
    /// For benchmarks only; tests run on the machine's own disk.
    pub async fn start_slow_disk(size: usize, delay: Duration) -> EtcdCluster {
        EtcdCluster::start_inner(size, false, Some(delay)).await
    }

    async fn start_with(size: usize, tls: bool) -> EtcdCluster {
        EtcdCluster::start_inner(size, tls, None).await
    }

    async fn start_inner(size: usize, tls: bool, sync_delay: Option<Duration>) -> EtcdCluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("leasehold-etcd-{unique}"));
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
        let pki = tls.then(|| EtcdPki::write(&dir));
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            token: format!("dl-test-{unique}"),
            pki,
            root_password: None,
            sync_delay,
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
        let client = self.endpoint(i);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", member.name)))
            .expect("etcd log file");
        let mut command = match self.sync_delay {
            None => Command::new(&binary),
            Some(delay) => {
                // Only the sync calls stop for strace (seccomp-bpf), so nothing else slows.
                let mut command = Command::new("strace");
                command
                    .args(["-f", "--seccomp-bpf", "-qq", "-o", "/dev/null"])
                    .args(["-e", "trace=fsync,fdatasync"])
                    .arg("-e")
                    .arg(format!(
                        "inject=fsync,fdatasync:delay_exit={}",
                        delay.as_micros()
                    ))
                    .arg(&binary)
                    // Its own process group, so that a kill reaches etcd, not only strace.
                    .process_group(0);
                command
            }
        };
        if let Some(pki) = &self.pki {
            command
                .arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        let child = command
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
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// How a test client reaches the cluster: with its TLS certificates, and as root once
    /// authentication is on.
    fn options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new();
        if let Some(pki) = &self.pki {
            options = options.with_tls(pki.options());
        }
        if let Some(password) = &self.root_password {
            options = options.with_user("root", password);
        }
        options
    }

    /// Writes a file into the cluster's directory (removed with it).
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("file in the etcd directory");
        path
    }

    /// A client of the cluster (as root once authentication is on).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), Some(self.options()))
            .await
            .expect("etcd client connects")
    }

    /// Turns etcd's authentication on: the `root` user that etcd requires, and `user` with
    /// read and write permission on the keys under `prefix` only.
    pub async fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) {
        let mut etcd = self.client().await;
        let root_password = "root-secret";
        etcd.user_add("root", root_password, None).await.unwrap();
        etcd.user_grant_role("root", "root").await.unwrap();
        etcd.role_add("locks").await.unwrap();
        etcd.role_grant_permission("locks", Permission::read_write(prefix).with_prefix())
            .await
            .unwrap();
        etcd.user_add(user, password, None).await.unwrap();
        etcd.user_grant_role(user, "locks").await.unwrap();
        etcd.auth_enable().await.unwrap();
        self.root_password = Some(root_password.to_owned());
    }

    /// The process id of member `i`'s etcd, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        let id = self.members[i].child.as_ref().map(Child::id)?;
        if self.sync_delay.is_none() {
            return Some(id);
        }
        // etcd is strace's child.
        std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Kills member `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            if self.sync_delay.is_some() {
                // strace's process group: strace and the etcd it runs.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
            }
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
                    etcd_client::Client::connect([self.endpoint(i)], Some(self.options())),
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
                if answers(&self.endpoint(i), self.options()).await {
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
async fn answers(endpoint: &str, options: ConnectOptions) -> bool {
    let options = options
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

/// An etcd store over `cluster`, standing for one server (two stand for two servers).
pub async fn store(
    cluster: &EtcdCluster,
) -> std::sync::Arc<leasehold::server::store::etcd::EtcdStore> {
    use leasehold::server::store::etcd::{EtcdConfig, EtcdStore};
    let store = EtcdStore::connect(EtcdConfig::new(cluster.endpoints()))
        .await
        .expect("connects to etcd");
    std::sync::Arc::new(store)
}

/// The project the store tests act in.
pub fn project() -> leasehold::server::store::Project {
    leasehold::server::store::Project {
        id: 0,
        name: "project".into(),
    }
}
