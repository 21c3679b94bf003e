//! The `leasehold` command line, as real processes against a real server.
#![cfg(unix)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::proxy::Proxy;
use support::{TestServer, dead_addr, eventually, within};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
/// Generous: the machine is small and tests run in parallel.
const BOUND: Duration = Duration::from_secs(20);

/// `leasehold ARGS` against `url` with key `p`; stdin closed, output captured.
fn cli(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("LEASEHOLD_URL", url)
        .env("LEASEHOLD_API_KEY", "p")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// `leasehold run NAME OPTIONS -- sh -c SCRIPT`, started.
fn run_sh(url: &str, name: &str, options: &[&str], script: &str) -> Child {
    let mut args = vec!["run", name];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    cli(url, &args).spawn().expect("leasehold starts")
}

async fn finish(child: Child) -> Output {
    within(BOUND, child.wait_with_output())
        .await
        .expect("leasehold ran")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A directory of its own per test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "leasehold-cli-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A path in the directory, as a string for shell scripts (no spaces in it).
    fn file(&self, name: &str) -> String {
        let path = self.0.join(name).to_string_lossy().into_owned();
        assert!(!path.contains(char::is_whitespace) && !path.contains('\''));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn file_contains(path: &str, text: &str) -> bool {
    read(path).contains(text)
}

/// Whether the process `pid` still runs (a zombie does not count).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = child.id().expect("still running") as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[tokio::test]
async fn runs_on_one_name_take_turns_and_never_overlap() {
    let server = TestServer::start().await;
    let dir = TempDir::new("turns");
    let (log, go) = (dir.file("log"), dir.file("go"));
    // Each run logs its start (with token and lock name) and end; the first one holds on
    // until every other one waits in line.
    let script = format!(
        "echo \"start $LEASEHOLD_FENCING_TOKEN $LEASEHOLD_NAME $(date +%s%N)\" >> '{log}'
         while [ ! -e '{go}' ]; do sleep 0.01; done
         sleep 0.2
         echo \"end $(date +%s%N)\" >> '{log}'"
    );
    let runs: Vec<Child> = (0..3)
        .map(|_| run_sh(&server.url(), "turns", &[], &script))
        .collect();
    eventually(BOUND, "one runs and two wait", || async {
        read(&log).lines().count() == 1 && server.inspect("p", "turns").await.1 == 2
    })
    .await;
    std::fs::write(&go, "").unwrap();
    for run in runs {
        let output = finish(run).await;
        assert!(output.status.success(), "{output:?}");
        assert!(
            output.stderr.is_empty(),
            "quiet without a terminal: {output:?}"
        );
    }

    let log = read(&log);
    let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 6, "{log}");
    let mut last_end = 0u128;
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let (start, end) = (&pair[0], &pair[1]);
        assert_eq!(start[0], "start", "runs overlapped:\n{log}");
        assert_eq!(end[0], "end", "runs overlapped:\n{log}");
        let token: u64 = start[1].parse().unwrap();
        assert_eq!(start[2], "turns");
        let (started, ended): (u128, u128) = (start[3].parse().unwrap(), end[1].parse().unwrap());
        assert!(token > last_token, "fencing tokens increase:\n{log}");
        assert!(started >= last_end, "runs overlapped:\n{log}");
        assert!(ended >= started);
        (last_token, last_end) = (token, ended);
    }
    assert_eq!(server.inspect("p", "turns").await, (None, 0), "released");
}

#[tokio::test]
async fn exit_codes_pass_through_and_the_lock_is_released() {
    let server = TestServer::start().await;
    for (script, code) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("exit 255", 255),
        ("kill -KILL $$", 128 + 9),
        ("kill -TERM $$", 128 + 15),
    ] {
        let output = finish(run_sh(&server.url(), "codes", &[], script)).await;
        assert_eq!(output.status.code(), Some(code), "{script}: {output:?}");
        assert_eq!(server.inspect("p", "codes").await, (None, 0), "{script}");
    }
}

#[tokio::test]
async fn commands_that_cannot_run_exit_126_or_127() {
    let server = TestServer::start().await;
    let dir = TempDir::new("exec");
    let missing = dir.file("no-such-command");
    let output = finish(
        cli(&server.url(), &["run", "exec", "--", &missing])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(output.status.code(), Some(127), "{output:?}");
    assert!(stderr(&output).contains("cannot run"), "{output:?}");

    let not_executable = dir.file("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let output = finish(
        cli(&server.url(), &["run", "exec", "--", &not_executable])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(output.status.code(), Some(126), "{output:?}");
    assert_eq!(server.inspect("p", "exec").await, (None, 0), "released");
}

#[tokio::test]
async fn a_timeout_exits_75_without_running_the_command() {
    let server = TestServer::start().await;
    let dir = TempDir::new("timeout");
    let ran = dir.file("ran");
    let holder = server
        .client("p")
        .lock("busy")
        .metadata("host-a/job-42")
        .await
        .unwrap();
    for timeout in ["300ms", "0"] {
        let started = Instant::now();
        let run = run_sh(
            &server.url(),
            "busy",
            &["--timeout", timeout],
            &format!("touch '{ran}'"),
        );
        let output = finish(run).await;
        assert_eq!(output.status.code(), Some(75), "{output:?}");
        assert!(!Path::new(&ran).exists(), "the command ran");
        if timeout == "300ms" {
            assert!(started.elapsed() >= Duration::from_millis(300));
        }
        // No status line without a terminal: one line saying what happened.
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{err:?}");
        assert!(!err.contains('\r'), "{err:?}");
        assert!(
            err.contains("timed out") && err.contains("not run"),
            "{err}"
        );
        // Who holds it, by label.
        assert!(
            err.contains(&format!(
                "held by \"host-a/job-42\" (fencing token {})",
                holder.fencing_token()
            )),
            "{err}"
        );
    }
    assert!(holder.is_held());
    assert_eq!(
        server.inspect("p", "busy").await,
        (Some(holder.fencing_token()), 0),
        "the timed-out waiters left the line"
    );
}

#[tokio::test]
async fn killing_the_holder_frees_the_lock_for_the_next_run() {
    let server = TestServer::start().await;
    let dir = TempDir::new("sigkill");
    let (pid_file, next_file) = (dir.file("pid"), dir.file("next"));
    // The workload replaces the shell, so its pid is the child's.
    let holder = run_sh(
        &server.url(),
        "killed",
        &["--expires-in", "2s"],
        &format!("echo $$ > '{pid_file}.tmp' && mv '{pid_file}.tmp' '{pid_file}' && exec sleep 60"),
    );
    eventually(BOUND, "the first command runs", || async {
        !read(&pid_file).is_empty()
    })
    .await;
    let workload: u32 = read(&pid_file).trim().parse().unwrap();
    let (first_token, _) = server.inspect("p", "killed").await;
    let first_token = first_token.expect("held");

    let next = run_sh(
        &server.url(),
        "killed",
        &[],
        &format!("echo $LEASEHOLD_FENCING_TOKEN > '{next_file}'"),
    );
    eventually(BOUND, "the second run waits", || async {
        server.inspect("p", "killed").await.1 == 1
    })
    .await;
    send_signal(&holder, libc::SIGKILL);
    let output = finish(next).await;
    assert!(output.status.success(), "{output:?}");
    let next_token: u64 = read(&next_file).trim().parse().unwrap();
    assert!(next_token > first_token);
    // On Linux the killed run's command dies with it (parent-death signal).
    eventually(BOUND, "the orphaned command is gone", || async {
        !is_running(workload)
    })
    .await;
    let killed = finish(holder).await;
    assert_eq!(killed.status.code(), None, "killed by a signal");
}

#[tokio::test]
async fn a_lost_lease_stops_the_command_before_anyone_else_gets_the_lock() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let dir = TempDir::new("lost");
    let log = dir.file("log");
    let run = run_sh(
        &proxy.url(),
        "lost",
        &["--expires-in", "4s", "--kill-after", "1500ms"],
        &format!(
            "trap 'echo stopping >> {log}; sleep 0.6; exit 0' TERM
             echo started >> '{log}'
             while :; do sleep 0.05; done"
        ),
    );
    eventually(BOUND, "the command runs", || async {
        file_contains(&log, "started").await
    })
    .await;
    // Someone else waits, straight at the server.
    let dl = server.client("p");
    let next = tokio::spawn(async move {
        let guard = dl.lock("lost").await.unwrap();
        (guard, Instant::now())
    });
    eventually(BOUND, "the other one waits", || async {
        server.inspect("p", "lost").await.1 == 1
    })
    .await;

    // The command takes 0.6 s to stop after SIGTERM: more than the SDK's default safety
    // margin (0.4 s), less than what the CLI asks for (--kill-after + 0.4 s).
    proxy.cut();
    let output = finish(run).await;
    let exited = Instant::now();
    assert_eq!(output.status.code(), Some(76), "{output:?}");
    assert!(
        file_contains(&log, "stopping").await,
        "the command got SIGTERM"
    );
    assert!(stderr(&output).contains("lost the lease"), "{output:?}");
    let (_guard, granted) = within(BOUND, next).await.unwrap();
    assert!(
        exited < granted,
        "the command still ran {:?} after the lock went to the next holder",
        exited - granted
    );
}

#[tokio::test]
async fn a_server_restarted_without_state_revokes_the_lease_and_stops_the_command() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let dir = TempDir::new("revoked");
    let log = dir.file("log");
    let run = run_sh(
        &server.url(),
        "revoked",
        &["--expires-in", "3s"],
        &format!("echo started >> '{log}'; exec sleep 60"),
    );
    eventually(BOUND, "the command runs", || async {
        file_contains(&log, "started").await
    })
    .await;
    server.stop().await;
    let _restarted = TestServer::restart_on(addr, |b| b).await;
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(76), "{output:?}");
    assert!(
        stderr(&output).contains("(it died of signal 15)"),
        "{output:?}"
    );
}

#[tokio::test]
async fn max_hold_stops_the_command_with_sigterm_then_sigkill() {
    let server = TestServer::start().await;
    let dir = TempDir::new("max-hold");
    let (log, pid_file) = (dir.file("log"), dir.file("pid"));
    // A command that stops on SIGTERM, and has started something in the background.
    let run = run_sh(
        &server.url(),
        "max-hold",
        &["--max-hold", "300ms"],
        &format!(
            "trap 'echo stopping >> {log}; exit 0' TERM
             sleep 60 &
             echo $! > '{pid_file}'
             while :; do sleep 0.05; done"
        ),
    );
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    assert!(file_contains(&log, "stopping").await);
    let background: u32 = read(&pid_file).trim().parse().unwrap();
    eventually(BOUND, "the background process is stopped too", || async {
        !is_running(background)
    })
    .await;
    // The command stopped a margin before --max-hold; the server frees the lock at it.
    eventually(BOUND, "the lock is free", || async {
        server.inspect("p", "max-hold").await == (None, 0)
    })
    .await;

    // A command that ignores SIGTERM (its children inherit that) gets SIGKILL.
    let started = Instant::now();
    let run = run_sh(
        &server.url(),
        "max-hold",
        &["--max-hold", "300ms", "--kill-after", "500ms"],
        "trap '' TERM; while :; do sleep 0.05; done",
    );
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    // SIGTERM comes a safety margin before the server frees the lock (here half the 300 ms,
    // the most a margin may take), SIGKILL 500 ms after it.
    assert!(started.elapsed() >= Duration::from_millis(650));
    let err = stderr(&output);
    assert!(err.contains("SIGKILL") && err.contains("signal 9"), "{err}");
    // The command stopped a margin before --max-hold; the server frees the lock at it.
    eventually(BOUND, "the lock is free", || async {
        server.inspect("p", "max-hold").await == (None, 0)
    })
    .await;
}

#[tokio::test]
async fn sigterm_and_sigint_are_passed_on_to_the_command() {
    let server = TestServer::start().await;
    let dir = TempDir::new("forward");
    for (signal, name, code) in [(libc::SIGTERM, "TERM", 7), (libc::SIGINT, "INT", 9)] {
        let log = dir.file(name);
        let run = run_sh(
            &server.url(),
            "forward",
            &[],
            &format!(
                "trap 'echo got >> {log}; exit {code}' {name}
                 echo ready >> '{log}'
                 while :; do sleep 0.05; done"
            ),
        );
        eventually(BOUND, "the command runs", || async {
            file_contains(&log, "ready").await
        })
        .await;
        send_signal(&run, signal);
        let output = finish(run).await;
        assert_eq!(output.status.code(), Some(code), "{output:?}");
        assert!(
            file_contains(&log, "got").await,
            "{name} reached the command"
        );
        assert_eq!(server.inspect("p", "forward").await, (None, 0), "released");
    }
}

#[tokio::test]
async fn a_signal_while_waiting_withdraws_from_the_line() {
    // A long grace: only an explicit withdrawal empties the line within the test's bound.
    let server = TestServer::start_with(|b| b.grace(Duration::from_secs(60))).await;
    let dir = TempDir::new("withdraw");
    let ran = dir.file("ran");
    let _holder = server.client("p").lock("withdraw").await.unwrap();
    let run = run_sh(&server.url(), "withdraw", &[], &format!("touch '{ran}'"));
    eventually(BOUND, "the run waits", || async {
        server.inspect("p", "withdraw").await.1 == 1
    })
    .await;
    send_signal(&run, libc::SIGINT);
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    assert!(!Path::new(&ran).exists(), "the command ran");
    eventually(
        Duration::from_secs(10),
        "the waiter is withdrawn",
        || async { server.inspect("p", "withdraw").await.1 == 0 },
    )
    .await;
}

#[tokio::test]
async fn status_shows_the_holder_and_the_waiters() {
    let server = TestServer::start().await;
    let status = |args: &[&str]| cli(&server.url(), args).output();

    let output = within(BOUND, status(&["status", "st", "--json"]))
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let free: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        free,
        serde_json::json!({"name": "st", "mode": "exclusive", "permits": null, "holder": null,
                           "holders": [], "waiters": 0, "oldest_wait_ms": null,
                           "held_back_until": null})
    );

    let holder = server
        .client("p")
        .lock("st")
        .metadata("host-a/job-42")
        .await
        .unwrap();
    let dl = server.client("p");
    let _waiter = tokio::spawn(async move { dl.lock("st").await });
    eventually(BOUND, "one waits", || async {
        server.inspect("p", "st").await.1 == 1
    })
    .await;

    let output = within(BOUND, status(&["status", "st", "--json"]))
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let held: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(held["name"], "st");
    assert_eq!(held["waiters"], 1);
    assert_eq!(held["holder"]["fencing_token"], holder.fencing_token());
    assert_eq!(held["holder"]["label"], "host-a/job-42");
    assert!(held["holder"]["since"].as_str().unwrap().ends_with('Z'));
    assert!(held["oldest_wait_ms"].as_u64().is_some());
    assert!(held["holder"]["expires_in_ms"].as_u64().unwrap() <= 10_000);
    assert!(
        held["holder"]["lease_deadline"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    let output = within(BOUND, status(&["status", "st"])).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "host-a/job-42 (fencing token {})",
            holder.fencing_token()
        )),
        "{text}"
    );
    assert!(text.contains("since:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("waiters:") && l.contains(" 1 (the first has waited")),
        "{text}"
    );
}

#[tokio::test]
async fn usage_errors_exit_64() {
    let url = "http://127.0.0.1:1";
    for args in [
        &["run", "x"][..],                                     // no command
        &["run", "x", "--timeout", "5 parsecs", "--", "true"], // bad duration
        &["run", "x", "--expires-in", "0", "--", "true"],
        &["run", "x", "--timeout", "5", "--", "true"], // a duration without its unit
        &["run", "x", "-c", "true", "--", "true"],     // -c and a command
        &["run", "bad\nname", "--", "true"],           // invalid lock name
        &["status", "bad\nname"],
        &["list", "x", "--limit", "5"],
        &["frobnicate"],
    ] {
        let output = within(BOUND, cli(url, args).output()).await.unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}: {output:?}");
    }
    let output = within(
        BOUND,
        cli(url, &["run", "x", "--timeout", "5", "--", "true"]).output(),
    )
    .await
    .unwrap();
    assert!(
        stderr(&output).contains("write 5s for seconds"),
        "{output:?}"
    );
}

#[tokio::test]
async fn without_a_key_the_cli_uses_the_key_default_and_says_so() {
    // Open mode accepts it.
    let server = TestServer::start().await;
    let holder = server.client("default").lock("k").await.unwrap();
    let output = within(
        BOUND,
        cli(&server.url(), &["status", "k", "--json"])
            .env_remove("LEASEHOLD_API_KEY")
            .output(),
    )
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "said once: {err}");
    assert!(
        err.contains("no API key configured") && err.contains("\"default\""),
        "{err}"
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["holder"]["fencing_token"], holder.fencing_token());
    server.stop().await;

    // A server with a key file refuses it, as any unknown key: 401, exit 77.
    let dir = TempDir::new("default-key");
    let keys = dir.file("keys.toml");
    let (_, line) = leasehold::server::new_key("ops");
    std::fs::write(
        &keys,
        format!("[[projects]]\nname = \"ops\"\nkeys = [{line}\n]\n"),
    )
    .unwrap();
    let server = TestServer::start_with(|b| b.key_file(&keys)).await;
    let output = within(
        BOUND,
        cli(&server.url(), &["list"])
            .env_remove("LEASEHOLD_API_KEY")
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(77), "{output:?}");
    assert!(
        stderr(&output).contains("refused the API key"),
        "{output:?}"
    );
}

#[tokio::test]
async fn dash_c_runs_a_shell_command_line() {
    let server = TestServer::start().await;
    let dir = TempDir::new("dash-c");
    let out = dir.file("out");
    let output = finish(
        cli(
            &server.url(),
            &[
                "run",
                "c",
                "-c",
                &format!("echo \"$LEASEHOLD_NAME\" > '{out}'; exit 3"),
            ],
        )
        .spawn()
        .unwrap(),
    )
    .await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(read(&out), "c\n");
}

#[tokio::test]
async fn a_wait_over_a_second_prints_one_line_naming_the_holder() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let server = TestServer::start().await;
    let holder = server
        .client("p")
        .lock("q")
        .metadata("host-a/job-42")
        .await
        .unwrap();
    let mut run = cli(&server.url(), &["run", "q", "--", "true"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stderr.take().unwrap()).lines();
    let line = within(BOUND, lines.next_line())
        .await
        .unwrap()
        .expect("a line");
    let expected = format!(
        "leasehold: waiting for \"q\": 1s; 0 ahead; held by \"host-a/job-42\" (fencing token {}), ",
        holder.fencing_token()
    );
    assert!(
        line.starts_with(&expected) && line.ends_with(" left"),
        "{line}"
    );
    holder.release().await.unwrap();
    let status = within(BOUND, run.wait()).await.unwrap();
    assert!(status.success());
    assert_eq!(
        within(BOUND, lines.next_line()).await.unwrap(),
        None,
        "one line only"
    );
}

#[tokio::test]
async fn help_shows_examples_and_exit_codes_but_never_the_key() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["status", "--help"],
        &["list", "--help"],
    ] {
        let output = within(
            BOUND,
            cli("http://127.0.0.1:1", args)
                .env("LEASEHOLD_API_KEY", "very-secret-key")
                .output(),
        )
        .await
        .unwrap();
        assert!(output.status.success(), "{output:?}");
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(help.contains("Examples:"), "{help}");
        assert!(help.contains("Exit codes"), "{help}");
        assert!(!help.contains("very-secret-key"), "{help}");
    }
}

#[tokio::test]
async fn an_unreachable_server_exits_69() {
    let url = format!("http://{}", dead_addr().await);
    let dir = TempDir::new("unavailable");
    let ran = dir.file("ran");
    let touch = format!("touch '{ran}'");
    let run = cli(
        &url,
        &["run", "x", "--timeout", "1s", "--", "sh", "-c", &touch],
    )
    .env("LEASEHOLD_API_KEY", "very-secret-key")
    .spawn()
    .unwrap();
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(!Path::new(&ran).exists(), "the command ran");
    let err = stderr(&output);
    assert!(
        err.contains("unavailable") && !err.contains("very-secret-key"),
        "{err}"
    );

    let output = within(BOUND, cli(&url, &["status", "x"]).output())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(69), "{output:?}");
}

/// `script` gives the command a pseudo-terminal: `sh -c COMMAND` runs in a new session with
/// the terminal as its stdin, stdout and stderr.
fn in_terminal(url: &str, command: &str) -> Command {
    let mut cmd = Command::new("script");
    cmd.args(["-qec", command, "/dev/null"])
        .env("LEASEHOLD_URL", url)
        .env("LEASEHOLD_API_KEY", "p")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn on_a_terminal_a_status_line_shows_the_wait() {
    let server = TestServer::start().await;
    let holder = server.client("p").lock("tty").await.unwrap();
    let dl = server.client("p");
    let _ahead = tokio::spawn(async move { dl.lock("tty").await });
    eventually(BOUND, "one waits", || async {
        server.inspect("p", "tty").await.1 == 1
    })
    .await;
    let run = in_terminal(
        &server.url(),
        &format!("{BIN} run tty --timeout 2500ms -- true"),
    )
    .spawn()
    .unwrap();
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    let screen = String::from_utf8_lossy(&output.stdout);
    let token = holder.fencing_token();
    assert!(
        screen.contains(&format!(
            "waiting for \"tty\": 1s; 1 ahead; held by fencing token {token}, "
        )),
        "{screen:?}"
    );
    // The line is erased before the final message.
    assert!(
        screen.contains("\r\x1b[2Kleasehold: timed out"),
        "{screen:?}"
    );
}

#[tokio::test]
async fn on_a_terminal_the_command_can_read_from_it() {
    let server = TestServer::start().await;
    let mut run = in_terminal(
        &server.url(),
        &format!("{BIN} run tty-input -- sh -c 'read line; echo got:$line'"),
    )
    .spawn()
    .unwrap();
    let mut stdin = run.stdin.take().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    drop(stdin);
    let output = finish(run).await;
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("got:hello"),
        "{output:?}"
    );
}

#[tokio::test]
async fn a_kill_after_too_long_for_the_lease_is_warned_about() {
    let server = TestServer::start().await;
    let output = finish(run_sh(
        &server.url(),
        "warn",
        &["--expires-in", "4s"],
        "exit 0",
    ))
    .await;
    assert!(output.status.success(), "{output:?}");
    let err = stderr(&output);
    assert!(
        err.contains("warning") && err.contains("--kill-after 10s"),
        "{err}"
    );
    // The defaults are consistent.
    let output = finish(run_sh(&server.url(), "warn", &[], "exit 0")).await;
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[tokio::test]
async fn list_shows_every_lock_as_a_table_and_as_json() {
    let server = TestServer::start().await;
    let list = |args: &[&str]| cli(&server.url(), args).output();
    let dl = server.client("p");
    let db = dl
        .lock("db/migrate")
        .metadata("host-a/job-42")
        .await
        .unwrap();
    let _cache = dl.lock("cache/warm").await.unwrap();
    let waiter = server.client("p");
    let _waiter = tokio::spawn(async move { waiter.lock("db/migrate").await });
    eventually(BOUND, "one waits", || async {
        server.inspect("p", "db/migrate").await.1 == 1
    })
    .await;

    let output = within(BOUND, list(&["list"])).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("LEASE LEFT"),
        "{text}"
    );
    assert!(lines[1].starts_with("cache/warm "), "{text}");
    let db_line = lines[2];
    assert!(db_line.starts_with("db/migrate "), "{text}");
    assert!(db_line.contains("host-a/job-42"), "{text}");
    assert!(db_line.contains(&db.fencing_token().to_string()), "{text}");

    let output = within(BOUND, list(&["list", "db/", "--json"]))
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let locks = json.as_array().expect("an array");
    assert_eq!(locks.len(), 1, "{json}");
    assert_eq!(locks[0]["name"], "db/migrate");
    assert_eq!(locks[0]["waiters"], 1);
    assert_eq!(locks[0]["holder"]["label"], "host-a/job-42");
    assert_eq!(locks[0]["holder"]["fencing_token"], db.fencing_token());

    let output = within(BOUND, list(&["list", "nothing/"])).await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "no locks held or waited for\n"
    );
}

#[tokio::test]
async fn revoke_ends_the_holders_lease_and_says_when_nobody_holds() {
    let server = TestServer::start().await;
    let lease = Duration::from_secs(2);
    let holder = server
        .client("p")
        .lock("rv")
        .expires_in(lease)
        .await
        .unwrap();
    let token = holder.fencing_token();
    let output = within(BOUND, cli(&server.url(), &["revoke", "rv"]).output())
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains(&format!("fencing token {token}")),
        "{printed}"
    );
    // The holder hears it on its next renewal, due a third into the lease.
    assert_eq!(
        within(lease + BOUND, holder.lost()).await,
        leasehold::LostReason::Revoked
    );
    let output = within(BOUND, cli(&server.url(), &["revoke", "rv"]).output())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("nobody holds"), "{output:?}");
    // Another project's key sees nothing to revoke there.
    let _held = server.client("p").lock("rv").await.unwrap();
    let output = within(
        BOUND,
        cli(&server.url(), &["revoke", "rv"])
            .env("LEASEHOLD_API_KEY", "another-project")
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
}

#[tokio::test]
async fn permits_let_that_many_runs_share_a_name_and_readers_share_a_read_lock() {
    let server = TestServer::start().await;
    let dir = TempDir::new("permits");
    let go = dir.file("go");
    // Each run marks that it runs, then holds on until told to go.
    let holding = |mark: &str| {
        format!(
            "touch '{}'; while [ ! -e '{go}' ]; do sleep 0.01; done",
            dir.file(mark)
        )
    };
    let first = run_sh(&server.url(), "exports", &["--permits", "2"], &holding("a"));
    let second = run_sh(&server.url(), "exports", &["--permits", "2"], &holding("b"));
    let third = run_sh(&server.url(), "exports", &["--permits", "2"], &holding("c"));
    // Two run at once; the third waits for a permit.
    eventually(BOUND, "two runs hold permits, one waits", || async {
        let running = ["a", "b", "c"]
            .iter()
            .filter(|m| Path::new(&dir.file(m)).exists())
            .count();
        running == 2 && server.inspect("p", "exports").await.1 == 1
    })
    .await;
    let status = finish(cli(&server.url(), &["status", "exports"]).spawn().unwrap()).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("2 of 2 permits held"), "{text}");
    // Another count for the same name is refused with the count in use.
    let other = finish(run_sh(
        &server.url(),
        "exports",
        &["--permits", "3"],
        "true",
    ))
    .await;
    assert_eq!(other.status.code(), Some(64), "{other:?}");
    assert!(stderr(&other).contains("2 permits"), "{}", stderr(&other));

    // Readers share; a run without --read (a writer) waits for them.
    let r1 = run_sh(&server.url(), "config", &["--read"], &holding("r1"));
    let r2 = run_sh(&server.url(), "config", &["--read"], &holding("r2"));
    eventually(BOUND, "both readers run", || async {
        Path::new(&dir.file("r1")).exists() && Path::new(&dir.file("r2")).exists()
    })
    .await;
    let writer = finish(run_sh(&server.url(), "config", &["--timeout", "0"], "true")).await;
    assert_eq!(writer.status.code(), Some(75), "{writer:?}");

    std::fs::write(&go, "").unwrap();
    for run in [first, second, third, r1, r2] {
        let output = finish(run).await;
        assert!(output.status.success(), "{output:?}");
    }
}

#[tokio::test]
async fn elect_runs_the_command_only_while_leading_and_shows_its_value() {
    let server = TestServer::start().await;
    let dir = TempDir::new("elect");
    let (log, go) = (dir.file("log"), dir.file("go"));
    let script = format!(
        "echo \"leads $LEASEHOLD_FENCING_TOKEN\" >> '{log}'; while [ ! -e '{go}' ]; do sleep 0.01; done"
    );
    let elect = |value: &str| {
        cli(
            &server.url(),
            &[
                "elect",
                "scheduler",
                "--value",
                value,
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .spawn()
        .unwrap()
    };
    let a = elect("host-a:8080");
    eventually(BOUND, "a leads", || async {
        read(&log).lines().count() == 1
    })
    .await;
    let b = elect("host-b:8080");
    eventually(BOUND, "b stands by", || async {
        server.inspect("p", "scheduler").await.1 == 1
    })
    .await;
    let status = finish(
        cli(&server.url(), &["status", "scheduler"])
            .spawn()
            .unwrap(),
    )
    .await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("leader value: host-a:8080"), "{text}");
    assert_eq!(
        read(&log).lines().count(),
        1,
        "only the leader runs its command"
    );
    // The leader's command ends: the candidate standing by leads and runs its own.
    std::fs::write(&go, "").unwrap();
    let a = finish(a).await;
    assert!(a.status.success(), "{a:?}");
    let b = finish(b).await;
    assert!(b.status.success(), "{b:?}");
    let tokens: Vec<u64> = read(&log)
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1] > tokens[0], "{tokens:?}");
}
