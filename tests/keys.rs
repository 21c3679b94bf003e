//! API keys and projects: key files, reloads, isolation, quotas, rate limits. Isolation and
//! quotas run against both stores (`name::memory`, `name::etcd`).

mod support;

use leasehold::server::new_key;
use std::time::Duration;
use support::key_file::KeyFile;
use support::{Backend, TestServer, client_for, eventually, raw, within};

const BOUND: Duration = Duration::from_secs(10);

fn project(name: &str, extra: &str, lines: &[&str]) -> String {
    format!(
        "[[projects]]\nname = \"{name}\"\n{extra}\nkeys = [\n{}\n]\n",
        lines.join("\n")
    )
}

async fn start_with_keys(file: &KeyFile) -> TestServer {
    start_with_keys_on(Backend::Memory, file).await
}

async fn start_with_keys_on(backend: Backend, file: &KeyFile) -> TestServer {
    let path = file.path.clone();
    TestServer::start_on_with(backend, move |b| {
        b.key_file(path)
            .key_reload_interval(Duration::from_millis(20))
    })
    .await
}

on_both_backends!(
    projects_are_isolated_and_other_projects_locks_answer_404,
    project_quotas_answer_429_and_limit_only_that_project,
);

async fn projects_are_isolated_and_other_projects_locks_answer_404(backend: Backend) {
    let (a, a_line) = new_key("alpha");
    let (b, b_line) = new_key("beta");
    let file = KeyFile::new(&format!("isolated-{backend:?}"));
    file.write(&(project("alpha", "", &[&a_line]) + &project("beta", "", &[&b_line])));
    let server = start_with_keys_on(backend, &file).await;
    assert!(server.addr.port() > 0);

    // Alpha takes "shared"; the raw answer gives us alpha's lease id.
    let body =
        r#"{"name":"shared","lease_ms":60000,"request_id":"0123456789abcdef0123456789abcdef"}"#;
    let (status, granted) = raw(
        server.addr,
        "POST",
        "/v1/acquire",
        &[("authorization", &format!("Bearer {a}"))],
        body,
    )
    .await;
    assert_eq!(status, 200, "{granted}");
    let granted: serde_json::Value = serde_json::from_str(&granted).unwrap();
    let lease_id = granted["lease_id"].as_str().unwrap();
    let before = server.inspect(&a, "shared").await;

    // Beta sees no such lock, cannot release alpha's lease with alpha's id, and gets a
    // lock of its own under the same name.
    let b_auth = [("authorization", format!("Bearer {b}"))];
    let b_auth: Vec<(&str, &str)> = b_auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _) = raw(server.addr, "GET", "/v1/locks/shared", &b_auth, "").await;
    assert_eq!(status, 404);
    let release = format!(r#"{{"name":"shared","lease_id":"{lease_id}"}}"#);
    let (status, _) = raw(server.addr, "POST", "/v1/release", &b_auth, &release).await;
    assert_eq!(status, 404);
    assert_eq!(server.inspect(&a, "shared").await, before);
    let mine = client_for(&server.url(), &b)
        .lock("shared")
        .timeout(Duration::ZERO)
        .await
        .unwrap();
    assert_ne!(Some(mine.fencing_token()), before.0);
    assert_eq!(server.inspect(&a, "shared").await, before);
}

#[tokio::test]
async fn unknown_keys_and_wrong_secrets_get_the_same_401_without_the_key() {
    let (good, line) = new_key("p");
    let file = KeyFile::new("401");
    file.write(&project("p", "", &[&line]));
    let server = start_with_keys(&file).await;
    let wrong_secret = format!("{}{}", &good[..13], "0".repeat(good.len() - 13));
    let (unknown, _) = new_key("p");
    let mut answers = Vec::new();
    for key in [wrong_secret.as_str(), unknown.as_str(), "not-a-dlk-key"] {
        let (status, body) = raw(
            server.addr,
            "GET",
            "/v1/locks/x",
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await;
        assert_eq!(status, 401);
        assert!(!body.contains(key), "the key must not be echoed: {body}");
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let err = client_for(&server.url(), &unknown)
        .lock("x")
        .await
        .unwrap_err();
    assert!(err.is_unauthorized(), "{err}");
    assert!(!err.to_string().contains(&unknown));
    // The good key works.
    let _held = client_for(&server.url(), &good).lock("x").await.unwrap();
}

#[tokio::test]
async fn keys_are_added_and_revoked_without_a_restart_and_held_locks_survive() {
    let (first, first_line) = new_key("p");
    let (second, second_line) = new_key("p");
    let file = KeyFile::new("reload");
    file.write(&project("p", "", &[&first_line]));
    let server = start_with_keys(&file).await;
    let held = client_for(&server.url(), &first)
        .lock("kept")
        .expires_in(Duration::from_millis(600))
        .await
        .unwrap();
    let second_client = client_for(&server.url(), &second);
    assert!(
        second_client
            .inspect("kept")
            .await
            .unwrap_err()
            .is_unauthorized()
    );

    // Add the second key: it works, and sees the first key's lock (same project).
    file.write(&project("p", "", &[&first_line, &second_line]));
    eventually(BOUND, "new key accepted", || async {
        second_client.inspect("kept").await.is_ok()
    })
    .await;
    let info = second_client.inspect("kept").await.unwrap();
    assert_eq!(info.holder.unwrap().fencing_token, held.fencing_token());

    // Revoke the second key: refused on its next request. The lock held under the first
    // key stays held through the reloads, renewals included.
    file.write(&project("p", "", &[&first_line]));
    eventually(BOUND, "revoked key refused", || async {
        second_client
            .inspect("kept")
            .await
            .is_err_and(|e| e.is_unauthorized())
    })
    .await;
    let renewed_after = server.metric("leasehold_renewals_total").await;
    eventually(BOUND, "more renewals", || async {
        server.metric("leasehold_renewals_total").await > renewed_after + 2.0
    })
    .await;
    assert!(held.is_held());
    // An invalid file changes nothing.
    file.write("this is not [toml");
    assert!(server.reload_keys().is_err());
    assert!(
        client_for(&server.url(), &first)
            .inspect("kept")
            .await
            .is_ok()
    );
}

async fn project_quotas_answer_429_and_limit_only_that_project(backend: Backend) {
    let (small, small_line) = new_key("small");
    let (big, big_line) = new_key("big");
    let file = KeyFile::new(&format!("quota-{backend:?}"));
    file.write(
        &(project(
            "small",
            "max_locks = 2\nmax_waiters_per_lock = 1",
            &[&small_line],
        ) + &project("big", "", &[&big_line])),
    );
    let server = start_with_keys_on(backend, &file).await;
    let dl = client_for(&server.url(), &small);
    let _one = dl.lock("one").await.unwrap();
    let _two = dl.lock("two").await.unwrap();
    let err = dl.lock("three").timeout(Duration::ZERO).await.unwrap_err();
    assert!(err.is_limit_reached(), "{err}");
    // One waiter on "one" is allowed, a second is refused.
    let first_waiter = tokio::spawn({
        let dl = dl.clone();
        async move { dl.lock("one").timeout(Duration::from_secs(30)).await }
    });
    eventually(BOUND, "waiter queued", || async {
        server.inspect(&small, "one").await.1 == 1
    })
    .await;
    let err = dl
        .lock("one")
        .timeout(Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.is_limit_reached(), "{err}");
    first_waiter.abort();
    // The other project is not affected.
    let other = client_for(&server.url(), &big);
    for name in ["one", "two", "three", "four"] {
        let guard = other.lock(name).timeout(Duration::ZERO).await;
        assert!(guard.is_ok(), "{name}: {:?}", guard.err());
    }
}

#[tokio::test]
async fn a_noisy_key_is_rate_limited_and_other_projects_are_not() {
    let (noisy, noisy_line) = new_key("noisy");
    let (quiet, quiet_line) = new_key("quiet");
    let file = KeyFile::new("rate");
    file.write(
        &(project("noisy", "rate_limit = 5\nburst = 5", &[&noisy_line])
            + &project("quiet", "", &[&quiet_line])),
    );
    let server = start_with_keys(&file).await;
    let mut statuses = Vec::new();
    let mut retry_after = Vec::new();
    for _ in 0..20 {
        let (status, _) = raw(
            server.addr,
            "GET",
            "/v1/locks/x",
            &[("authorization", &format!("Bearer {noisy}"))],
            "",
        )
        .await;
        let (quiet_status, _) = raw(
            server.addr,
            "GET",
            "/v1/locks/x",
            &[("authorization", &format!("Bearer {quiet}"))],
            "",
        )
        .await;
        assert_ne!(
            quiet_status, 429,
            "the quiet project must never be throttled"
        );
        statuses.push(status);
        if status == 429 {
            retry_after.push(());
        }
    }
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert!(throttled >= 10, "{statuses:?}");
    // The SDK reports the limit with the server's Retry-After.
    let err = client_for(&server.url(), &noisy)
        .lock("y")
        .timeout(Duration::ZERO)
        .await
        .unwrap_err();
    match err {
        leasehold::Error::LimitReached { retry_after, .. } => {
            assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
        }
        other => panic!("expected LimitReached, got {other}"),
    }
    assert!(!retry_after.is_empty());
}

/// A throttled key can still renew, release and withdraw: the limit never keeps a lock (or
/// a place in line) taken longer than its client wants.
#[tokio::test]
async fn renewals_releases_and_cancels_are_never_rate_limited() {
    let (key, line) = new_key("slow");
    let file = KeyFile::new("exempt");
    file.write(&project("slow", "rate_limit = 1\nburst = 1", &[&line]));
    let server = start_with_keys(&file).await;
    let auth = format!("Bearer {key}");
    let post = |path: &'static str, body: String| {
        let auth = auth.clone();
        async move {
            let headers = [("authorization", auth.as_str())];
            raw(server.addr, "POST", path, &headers, &body).await
        }
    };
    let request_id = "44444444444444444444444444444444";
    let acquire = format!(r#"{{"name":"x","lease_ms":10000,"request_id":"{request_id}"}}"#);
    let (status, granted) = post("/v1/acquire", acquire.clone()).await;
    assert_eq!(status, 200, "{granted}");
    // The bucket is empty now: another acquire is throttled.
    let (status, _) = post("/v1/acquire", acquire.replace("\"x\"", "\"y\"")).await;
    assert_eq!(status, 429);
    let lease_id = serde_json::from_str::<serde_json::Value>(&granted).unwrap()["lease_id"].clone();
    let lease = format!(r#"{{"name":"x","lease_id":{lease_id}}}"#);
    let renew = format!(r#"{{"leases":[{lease}]}}"#);
    let cancel = format!(r#"{{"name":"x","request_id":"{request_id}"}}"#);
    for _ in 0..3 {
        let (status, body) = post("/v1/renew", renew.clone()).await;
        assert_eq!(status, 200, "renew: {body}");
    }
    let (status, body) = post("/v1/release", lease).await;
    assert_eq!(status, 200, "release: {body}");
    let (status, body) = post("/v1/cancel", cancel).await;
    assert_eq!(status, 200, "cancel: {body}");
}

#[tokio::test]
async fn the_new_key_subcommand_makes_a_key_the_server_accepts_and_sighup_reloads() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let bin = env!("CARGO_BIN_EXE_leasehold-server");
    let made = std::process::Command::new(bin)
        .args(["new-key", "--project", "ops"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let text = String::from_utf8(made.stdout).unwrap();
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("dlk_"))
        .unwrap()
        .to_owned();
    let line = text
        .lines()
        .find(|l| l.contains("sha256"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        !line.contains(&key),
        "the key file line holds only the digest"
    );

    let file = KeyFile::new("sighup");
    file.write(&project("ops", "", &[]));
    let mut child = tokio::process::Command::new(bin)
        // No polling of the file: only the SIGHUP can make the new key known.
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-state-file",
            "--key-check-interval",
            "0s",
            "--key-file",
        ])
        .arg(&file.path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let url = within(BOUND, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("server output");
            log.push(line.clone());
            if let Some((_, url)) = line.split_once("listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await;
    assert!(
        !log.iter().any(|l| l.contains("OPEN DEVELOPMENT MODE")),
        "{log:?}"
    );
    let dl = client_for(&url, &key);
    assert!(dl.inspect("x").await.unwrap_err().is_unauthorized());
    file.write(&project("ops", "", &[&line]));
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(BOUND, "key accepted after SIGHUP", || async {
        dl.inspect("x").await.is_ok()
    })
    .await;
    assert_eq!(dl.with_lock("x", || async { 7 }).await.unwrap(), 7);
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    within(BOUND, child.wait()).await.unwrap();
    // Nothing the server printed contains the key.
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(line);
    }
    assert!(!log.iter().any(|l| l.contains(&key)), "{log:?}");
}

#[tokio::test]
async fn the_example_key_file_works_with_its_documented_key() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keys.toml");
    let server = TestServer::start_with(move |b| b.key_file(path)).await;
    let key = "dlk_4cfb1ae5_45a1049c0b2bcd73695594eb17fc810bb084ee41";
    let dl = client_for(&server.url(), key);
    assert_eq!(dl.with_lock("example", || async { 1 }).await.unwrap(), 1);
    assert!(
        client_for(&server.url(), "dlk_4cfb1ae5_wrong")
            .inspect("example")
            .await
            .unwrap_err()
            .is_unauthorized()
    );
}
