//! Real processes for the fault suite: the server binary and the `leasehold` CLI.

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_leasehold-server");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// A `leasehold-server` process.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl ServerProcess {
    /// Starts the server with `args` and waits (with a generous bound) until it listens.
    pub async fn start(args: &[&str]) -> ServerProcess {
        let mut child = Command::new(SERVER_BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .env("STATE_DIRECTORY", own_state_directory())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("server binary starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = super::within(Duration::from_secs(20), async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the server printed its address");
                if let Some((_, url)) = line.split_once("listening on ") {
                    return url.trim().to_owned();
                }
            }
        })
        .await;
        // Keep draining its output so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess { child, url }
    }

    /// Starts the server with `args` and `env`, expecting it to fail: returns what it
    /// printed, once it has exited with an error (within a generous bound).
    pub async fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
        let run = Command::new(SERVER_BIN)
            .env("STATE_DIRECTORY", own_state_directory())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .kill_on_drop(true)
            .output();
        let output = super::within(Duration::from_secs(20), run)
            .await
            .expect("server binary runs");
        let printed = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "the server started: {printed}");
        printed
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM (graceful shutdown), and wait for it to exit.
    pub async fn terminate(mut self) {
        signal(self.pid(), libc::SIGTERM);
        super::within(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap();
    }
}

/// A fresh directory for a server process's default state file (it would otherwise be the
/// user's XDG state directory, shared by every test): servers that must find an earlier
/// run's state name their file with `--state-file`.
pub fn own_state_directory() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "leasehold-test-state-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid this test started; an error only means it is gone.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// `leasehold run NAME OPTIONS -- bash -c SCRIPT` against `url`.
pub fn cli_run(url: &str, name: &str, options: &[&str], script: &str) -> Child {
    cli_command(url, "run", name, options, script)
}

/// `leasehold SUBCOMMAND NAME OPTIONS -- bash -c SCRIPT` against `url` (`run`, `elect`).
pub fn cli_command(
    url: &str,
    subcommand: &str,
    name: &str,
    options: &[&str],
    script: &str,
) -> Child {
    Command::new(CLI_BIN)
        .args(["--url", url, "--api-key", "faults", subcommand, name])
        .args(options)
        .args(["--", "bash", "-c", script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the CLI starts")
}

/// A bash loop that writes the record of the lock it runs under to the fenced resource at
/// `addr` every 50 ms, as `client`, with the token `run` put in its environment.
pub fn writer_loop(addr: std::net::SocketAddr, client: &str) -> String {
    format!(
        "while :; do exec 3<>/dev/tcp/{}/{} || exit 1; echo \"W $LEASEHOLD_NAME {client} $LEASEHOLD_FENCING_TOKEN\" >&3; read -r answer <&3; exec 3>&-; sleep 0.05; done",
        addr.ip(),
        addr.port()
    )
}

/// One write to the resource, then exit.
pub fn write_once(addr: std::net::SocketAddr, client: &str) -> String {
    format!(
        "exec 3<>/dev/tcp/{}/{} && echo \"W $LEASEHOLD_NAME {client} $LEASEHOLD_FENCING_TOKEN\" >&3 && read -r answer <&3",
        addr.ip(),
        addr.port()
    )
}
