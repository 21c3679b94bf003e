//! The console (`/ui`) in a real headless Chromium against a real server whose locks are
//! held by real SDK clients, and the listing (`GET /v1/locks`) it reads, on both stores.
#[path = "support/browser.rs"]
mod browser;
mod support;

use browser::Browser;
use leasehold::server::new_key;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use support::key_file::KeyFile;
use support::{Backend, TestServer, eventually, raw};

/// What a person sees of one row of the lock table: the text of each cell, by column.
type Row = HashMap<String, String>;

const ROWS: &str = r#"
    return Array.from(document.querySelectorAll('#locks tbody tr')).map((tr) => {
        const row = {};
        for (const td of tr.cells) row[td.className.split(' ')[0]] = td.innerText;
        return row;
    });
"#;

async fn rows(browser: &Browser) -> Vec<Row> {
    let value = browser.eval(ROWS).await;
    serde_json::from_value(value).unwrap_or_default()
}

async fn row(browser: &Browser, name: &str) -> Option<Row> {
    rows(browser).await.into_iter().find(|r| r["name"] == name)
}

/// Whether the element is on screen (not hidden).
async fn visible(browser: &Browser, id: &str) -> bool {
    let script = format!(
        "const e = document.getElementById('{id}'); return !!e && e.offsetParent !== null;"
    );
    browser.eval(&script).await == Value::Bool(true)
}

/// Seconds in a countdown such as `12.3 s` or `1 min 05 s`.
fn seconds(text: &str) -> f64 {
    let parts: Vec<&str> = text.split_whitespace().collect();
    match parts.as_slice() {
        [s, "s"] => s.parse().expect("seconds"),
        [m, "min", s, "s"] => {
            m.parse::<f64>().expect("minutes") * 60.0 + s.parse::<f64>().expect("seconds")
        }
        _ => panic!("not a countdown: {text:?}"),
    }
}

/// A key file with one project, `ops`, and these keys.
fn ops_keys(lines: &[&str]) -> String {
    format!(
        "[[projects]]\nname = \"ops\"\nkeys = [\n{}\n]\n",
        lines.join("\n")
    )
}

/// Loads `url` afresh (a change of fragment alone would not reload the page).
async fn open(browser: &Browser, url: &str) {
    browser
        .client
        .goto("about:blank")
        .await
        .expect("blank page");
    browser.client.goto(url).await.expect("the page loads");
}

/// Whether the recent events show `what` happening to `lock`.
async fn shows_event(browser: &Browser, lock: &str, what: &str) -> bool {
    browser
        .texts("#events li")
        .await
        .iter()
        .any(|t| t.contains(lock) && t.contains(what))
}

/// Whether the page asks for a key again, saying the last one was refused.
async fn shows_refusal(browser: &Browser) -> bool {
    visible(browser, "login").await
        && browser
            .texts("#login-error")
            .await
            .iter()
            .any(|t| t.contains("refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser() {
    // Leases the test chose; every wait on the page is bounded by one of them.
    let lease = Duration::from_secs(20);
    // Starting a browser on a busy machine.
    let startup = Duration::from_secs(60);
    let escape = "<img src=x onerror=alert(1)>";

    let keys = KeyFile::new("console");
    let (key, key_line) = new_key("ops");
    let (other_key, other_line) = new_key("ops");
    keys.write(&ops_keys(&[&key_line, &other_line]));
    let path = keys.path.clone();
    let server = TestServer::start_with(move |b| {
        b.key_file(path)
            .key_reload_interval(Duration::from_millis(20))
    })
    .await;
    let dl = server.client(&key);
    let nightly = dl
        .lock("jobs/nightly")
        .metadata("host-a/job-42")
        .expires_in(lease)
        .await
        .expect("jobs/nightly");
    let escaped = dl
        .lock("jobs/escape")
        .metadata(escape)
        .expires_in(lease)
        .await
        .expect("jobs/escape");
    let contended = dl
        .lock("jobs/contended")
        .metadata("host-b")
        .expires_in(lease)
        .await
        .expect("jobs/contended");
    let other = dl.lock("other/x").expires_in(lease).await.expect("other/x");
    let waiter = {
        let dl = server.client(&other_key);
        tokio::spawn(async move {
            dl.lock("jobs/contended")
                .metadata("host-c")
                .expires_in(lease)
                .await
        })
    };
    eventually(lease, "the waiter in line", || async {
        dl.inspect("jobs/contended")
            .await
            .is_ok_and(|i| i.waiters == 1)
    })
    .await;

    let browser = Browser::start(startup).await;
    let page = format!("{}/ui", server.url());
    open(&browser, &format!("{page}#key={key}")).await;

    // The listing: every lock with its holder, token and waiters.
    eventually(startup, "the four locks listed", || async {
        rows(&browser).await.len() == 4
    })
    .await;
    let shown = row(&browser, "jobs/nightly")
        .await
        .expect("jobs/nightly shown");
    assert_eq!(shown["kind"], "held");
    assert_eq!(shown["label"], "host-a/job-42");
    assert_eq!(shown["token"], nightly.fencing_token().to_string());
    assert_eq!(shown["waiters"], "0");
    let left = seconds(&shown["left"]);
    assert!(left > 0.0 && left <= lease.as_secs_f64(), "{shown:?}");
    let shown = row(&browser, "jobs/contended")
        .await
        .expect("jobs/contended shown");
    assert_eq!(shown["label"], "host-b");
    assert_eq!(shown["waiters"], "1");
    assert!(
        !shown["wait"].is_empty(),
        "the longest wait is shown: {shown:?}"
    );
    let names: Vec<String> = rows(&browser)
        .await
        .into_iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["jobs/contended", "jobs/escape", "jobs/nightly", "other/x"]
    );

    // The key left the address bar.
    let url = browser.client.current_url().await.expect("url");
    assert_eq!(url.fragment(), None, "{url}");
    assert!(!url.as_str().contains(&key));

    // Escaping: the label is text, no element was made of it.
    let shown = row(&browser, "jobs/escape")
        .await
        .expect("jobs/escape shown");
    assert_eq!(shown["label"], escape);
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('img').length;")
            .await,
        Value::from(0)
    );

    // The countdown moves without a reload.
    let before = seconds(&row(&browser, "jobs/nightly").await.expect("row")["left"]);
    eventually(lease, "the lease countdown moving", || async {
        row(&browser, "jobs/nightly")
            .await
            .is_some_and(|r| r["left"].ends_with(" s") && seconds(&r["left"]) != before)
    })
    .await;

    // Recent events: the grants came in.
    eventually(lease, "the grant of jobs/nightly in the events", || {
        shows_event(&browser, "jobs/nightly", "granted")
    })
    .await;

    // The prefix filter.
    let filter = browser
        .client
        .find(fantoccini::Locator::Id("prefix"))
        .await
        .expect("the prefix box");
    filter.send_keys("other/").await.expect("typing");
    eventually(lease, "only other/x listed", || async {
        let names: Vec<String> = rows(&browser)
            .await
            .into_iter()
            .map(|r| r["name"].clone())
            .collect();
        names == ["other/x"]
    })
    .await;
    filter.clear().await.expect("clearing");
    eventually(lease, "every lock listed again", || async {
        rows(&browser).await.len() == 4
    })
    .await;

    let png = browser.client.screenshot().await.expect("screenshot");
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console.png");
    std::fs::write(&shot, png).expect("screenshot saved");

    // A release disappears from the list, and shows in the events.
    nightly.release().await.expect("release");
    eventually(lease, "jobs/nightly gone from the list", || async {
        let rows = rows(&browser).await;
        rows.len() == 3 && rows.iter().all(|r| r["name"] != "jobs/nightly")
    })
    .await;
    eventually(lease, "the release in the events", || {
        shows_event(&browser, "jobs/nightly", "released")
    })
    .await;

    // A wrong key is refused, and the page says so.
    open(&browser, &format!("{page}#key=wrong-key")).await;
    eventually(startup, "the wrong key refused", || shows_refusal(&browser)).await;
    assert!(!visible(&browser, "console").await);
    assert_eq!(
        browser
            .eval("return sessionStorage.getItem('leasehold.key');")
            .await,
        Value::Null,
        "a refused key is forgotten"
    );

    // A key that stops being valid (taken out of the key file) sends the page back to the
    // key prompt at its next refresh.
    open(&browser, &format!("{page}#key={key}")).await;
    eventually(startup, "the listing with the good key", || async {
        rows(&browser).await.len() == 3
    })
    .await;
    keys.write(&ops_keys(&[&other_line]));
    eventually(lease, "the revoked key refused", || shows_refusal(&browser)).await;

    browser.close().await;
    drop((escaped, contended, other));
    let _ = waiter.await;
    server.stop().await;
}

/// Creates `names` held by one client, and `waiting` waiters on the first.
async fn listing_pages(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let lease = server.lease(Duration::from_secs(30));
    let dl = server.client("list-key");
    let names = ["a", "a/b", "ab", "b/1", "b/2", "b/3", "ç"];
    let mut guards = Vec::new();
    for name in names {
        guards.push(
            dl.lock(name)
                .metadata(format!("holder of {name}"))
                .expires_in(lease)
                .await
                .expect("lock"),
        );
    }
    let waiter = {
        let dl = server.client("list-key");
        tokio::spawn(async move { dl.lock("b/2").expires_in(lease).await })
    };
    eventually(lease, "the waiter in line", || async {
        dl.inspect("b/2").await.is_ok_and(|i| i.waiters == 1)
    })
    .await;

    // Everything, in bytewise order, with holders and waiters.
    let page = dl.list("", None).await.expect("list");
    let listed: Vec<&str> = page.locks.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(listed, names);
    assert_eq!(page.next, None);
    for (lock, guard) in page.locks.iter().zip(&guards) {
        let holder = lock.holder.as_ref().expect("held");
        assert_eq!(holder.fencing_token, guard.fencing_token());
        assert_eq!(
            holder.metadata.as_deref(),
            Some(format!("holder of {}", lock.name).as_str())
        );
        assert!(holder.expires_in <= lease);
        assert_eq!(lock.waiters, u64::from(lock.name == "b/2"));
    }
    // Another project sees none of them.
    assert!(
        server
            .client("another-key")
            .list("", None)
            .await
            .expect("list")
            .locks
            .is_empty()
    );

    // A prefix, and pages of two over the raw protocol.
    let page = dl.list("a", None).await.expect("list");
    let listed: Vec<&str> = page.locks.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(listed, ["a", "a/b", "ab"]);
    let auth = [("authorization", "Bearer list-key")];
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let mut path = "/v1/locks?prefix=b%2F&limit=2".to_owned();
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", support::encode(after)));
        }
        let (status, body) = raw(server.addr, "GET", &path, &auth, "").await;
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).expect("json");
        let locks = page["locks"].as_array().expect("locks");
        assert!(locks.len() <= 2);
        seen.extend(
            locks
                .iter()
                .map(|l| l["name"].as_str().expect("name").to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["b/1", "b/2", "b/3"]);

    // `/v1/locks` lists, `/v1/locks/NAME` inspects, bad queries are refused.
    let (status, body) = raw(server.addr, "GET", "/v1/locks/ab", &auth, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""name":"ab""#), "{body}");
    for bad in [
        "/v1/locks?limit=0",
        "/v1/locks?limit=1001",
        "/v1/locks?colour=red",
    ] {
        let (status, body) = raw(server.addr, "GET", bad, &auth, "").await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = raw(server.addr, "GET", "/v1/locks", &[], "").await;
    assert_eq!(status, 401);

    // A released lock leaves the list.
    guards.remove(0).release().await.expect("release");
    let page = dl.list("a", None).await.expect("list");
    let listed: Vec<&str> = page.locks.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(listed, ["a/b", "ab"]);

    drop(guards);
    let _ = waiter.await;
    server.stop().await;
}

on_both_backends!(listing_pages);

/// The console's files carry a strict policy and refuse framing; the page has no inline
/// script.
#[tokio::test]
async fn console_headers() {
    let server = TestServer::start().await;
    for path in ["/ui", "/ui/app.js", "/ui/app.css"] {
        let head = answer_head(server.addr, path).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        for expected in [
            "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'",
            "frame-ancestors 'none'",
            "x-frame-options: deny",
            "x-content-type-options: nosniff",
        ] {
            assert!(
                head.contains(expected),
                "{path} lacks {expected:?}:\n{head}"
            );
        }
    }
    let (_, page) = raw(server.addr, "GET", "/ui", &[], "").await;
    assert!(page.contains(r#"<script src="/ui/app.js" defer></script>"#));
    assert_eq!(page.matches("<script").count(), 1, "no inline script");
    assert!(!page.contains("style="), "no inline style");
    server.stop().await;
}

/// The status line and headers of the answer to `GET path`.
async fn answer_head(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    support::within(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answer");
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split_once("\r\n\r\n")
        .map_or(answer.to_string(), |(head, _)| head.to_owned())
}

/// 10,000 locks: the page shows one page of them at a time, pages on, and filters by
/// prefix, without a row per lock of the project in the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_through_ten_thousand_locks() {
    const LOCKS: usize = 10_000;
    // Long enough to outlast the test without renewals; waits below are bounded by it.
    let lease = Duration::from_secs(300);
    let startup = Duration::from_secs(60);
    let server = TestServer::start().await;
    let dl = server.client("bulk-key");
    let mut guards = Vec::with_capacity(LOCKS);
    for chunk in (0..LOCKS).collect::<Vec<_>>().chunks(100) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let dl = dl.clone();
            set.spawn(async move {
                dl.lock(format!("bulk/{i:05}"))
                    .metadata(format!("worker-{}", i % 7))
                    .expires_in(lease)
                    .auto_renew(false)
                    .await
                    .expect("lock")
            });
        }
        while let Some(guard) = set.join_next().await {
            guards.push(guard.expect("task"));
        }
    }

    let browser = Browser::start(startup).await;
    open(&browser, &format!("{}/ui#key=bulk-key", server.url())).await;
    let page_info = || async { browser.texts("#page-info").await.concat() };
    eventually(startup, "the first page of 100", || async {
        rows(&browser).await.len() == 100 && page_info().await.contains("locks 1–100, more follow")
    })
    .await;
    let first = rows(&browser).await;
    assert_eq!(first[0]["name"], "bulk/00000");
    assert_eq!(first[99]["name"], "bulk/00099");
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#locks tbody tr').length;")
            .await,
        Value::from(100),
        "one page of rows in the page, not one per lock"
    );

    browser
        .client
        .find(fantoccini::Locator::Id("next"))
        .await
        .expect("the next button")
        .click()
        .await
        .expect("click");
    eventually(lease, "the second page", || async {
        page_info().await.contains("locks 101–200")
            && rows(&browser)
                .await
                .first()
                .is_some_and(|r| r["name"] == "bulk/00100")
    })
    .await;

    browser
        .client
        .find(fantoccini::Locator::Id("prefix"))
        .await
        .expect("the prefix box")
        .send_keys("bulk/0999")
        .await
        .expect("typing");
    eventually(lease, "the ten locks of the prefix", || async {
        let names: Vec<String> = rows(&browser)
            .await
            .into_iter()
            .map(|r| r["name"].clone())
            .collect();
        names.len() == 10 && names.iter().all(|n| n.starts_with("bulk/0999"))
    })
    .await;
    assert!(!page_info().await.contains("more follow"));

    browser.close().await;
    drop(guards);
    server.stop().await;
}
