//! A corpus of hostile raw HTTP requests. Each must get a 4xx or a clean close (never a 5xx
//! or a panic), and the lock state must be the same afterwards.

mod support;

use std::time::Duration;
use support::{TestServer, raw_bytes};

const ID: &str = "0123456789abcdef0123456789abcdef";

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

fn post(path: &str, body: &str) -> Vec<u8> {
    request(
        "POST",
        path,
        &[("authorization", "Bearer attacker")],
        body.as_bytes(),
    )
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut corpus: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |what: String, bytes: Vec<u8>| corpus.push((what, bytes));

    // Truncated JSON, at every few bytes of a valid body, on every POST route.
    let valid = [
        (
            "/v1/acquire",
            format!(r#"{{"name":"victim","lease_ms":60000,"wait_ms":0,"request_id":"{ID}"}}"#),
        ),
        (
            "/v1/renew",
            format!(r#"{{"leases":[{{"name":"victim","lease_id":"{ID}"}}]}}"#),
        ),
        (
            "/v1/release",
            format!(r#"{{"name":"victim","lease_id":"{ID}"}}"#),
        ),
        (
            "/v1/cancel",
            format!(r#"{{"name":"victim","request_id":"{ID}"}}"#),
        ),
    ];
    for (path, body) in &valid {
        for cut in (0..body.len() - 1).step_by(6) {
            add(
                format!("{path} truncated at {cut}"),
                post(path, &body[..cut]),
            );
        }
    }
    // Malformed JSON.
    for body in [
        "{",
        "}",
        "[]",
        "null",
        "\"str\"",
        "{\"name\":}",
        "{,}",
        "{\"name\":\"a\",}",
        "\u{0}",
        "{\"name\":\"a\"\"lease_ms\":1}",
        "😀",
        "\u{feff}{}",
    ] {
        add(format!("acquire body {body:?}"), post("/v1/acquire", body));
    }
    // Wrong types and huge numbers.
    for body in [
        format!(r#"{{"name":5,"lease_ms":1000,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":"1000","request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":1000.5,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":-1,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":1e30,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":18446744073709551616,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":18446744073709551615,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":true,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":null,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":1000,"wait_ms":"soon","request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":1000,"wait_ms":-5,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","lease_ms":1000,"poll_ms":[],"request_id":"{ID}"}}"#),
        r#"{"name":"a","lease_ms":1000,"request_id":12345}"#.to_owned(),
        r#"{"name":"a","lease_ms":1000,"request_id":"0123"}"#.to_owned(),
        r#"{"name":"a","lease_ms":1000,"request_id":"zz23456789abcdef0123456789abcdef"}"#
            .to_owned(),
        format!(r#"{{"name":"a","lease_ms":1000,"request_id":"{ID}","metadata":7}}"#),
        format!(r#"{{"name":"a","lease_ms":1000,"request_id":"{ID}","metadata":"x\u0007y"}}"#),
        format!(r#"{{"name":["a"],"lease_ms":1000,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":{{"a":1}},"lease_ms":1000,"request_id":"{ID}"}}"#),
        format!(r#"{{"name":"a","name":"b","lease_ms":1000,"request_id":"{ID}","x":1}}"#),
    ] {
        add(format!("acquire {body}"), post("/v1/acquire", &body));
    }
    for body in [
        r#"{"leases":{}}"#,
        r#"{"leases":[1,2]}"#,
        r#"{"leases":[{"name":"a"}]}"#,
        r#"{"leases":"all"}"#,
    ] {
        add(format!("renew {body}"), post("/v1/renew", body));
    }
    // Hostile names: control characters, NUL, overlong Unicode.
    let long_unicode = "é".repeat(200);
    for name in [
        "",
        "a\\u0000b",
        "\\u0000",
        "line\\nbreak",
        "tab\\there",
        "\\u001b[31mred",
        "\\u007f",
        &long_unicode,
        &"/".repeat(300),
        &"..".repeat(200),
    ] {
        add(
            format!("acquire name {:?}", &name[..name.len().min(20)]),
            post(
                "/v1/acquire",
                &format!(r#"{{"name":"{name}","lease_ms":60000,"request_id":"{ID}"}}"#),
            ),
        );
    }
    // Names with '/' and '..' are valid names: through inspection they only find nothing,
    // and path tricks in the URL do not reach other routes.
    for path in [
        "/v1/locks/..%2Facquire",
        "/v1/locks/../acquire",
        "/v1/locks/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/locks/a%00b",
        "/v1/locks/%ZZ",
        "/v1/locks/%C3%28",
        "/v1/locks/",
        "/v1/locks/%",
    ] {
        add(
            format!("inspect {path}"),
            request("GET", path, &[("authorization", "Bearer attacker")], b""),
        );
    }
    // Authorization: missing, garbled, duplicated — with an otherwise valid acquire.
    let good = format!(r#"{{"name":"victim","lease_ms":60000,"wait_ms":0,"request_id":"{ID}"}}"#);
    for headers in [
        vec![],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer ")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", "bearer\tkey")],
        vec![("authorization", "Token abc")],
        vec![("authorization", "Bearer a b c")],
        vec![
            ("authorization", "Bearer victim"),
            ("authorization", "Bearer victim"),
        ],
        vec![("authorization", "Bearer victim, Bearer other")],
        vec![
            ("Authorization", "Bearer victim"),
            ("AUTHORIZATION", "Bearer x"),
        ],
    ] {
        add(
            format!("auth {headers:?}"),
            request("POST", "/v1/acquire", &headers, good.as_bytes()),
        );
    }
    let mut garbled = b"POST /v1/acquire HTTP/1.1\r\nhost: t\r\nconnection: close\r\nauthorization: Bearer \xff\xfe\x00key\r\n".to_vec();
    garbled.extend_from_slice(format!("content-length: {}\r\n\r\n{good}", good.len()).as_bytes());
    add("auth with invalid bytes".into(), garbled);
    add(
        "auth with a 10 kB key".into(),
        request(
            "POST",
            "/v1/acquire",
            &[("authorization", &format!("Bearer {}", "k".repeat(10_000)))],
            b"{}",
        ),
    );
    // Content-Length and Transfer-Encoding conflicts and lies.
    for head in [
        format!(
            "content-length: {}\r\ntransfer-encoding: chunked\r\n",
            good.len()
        ),
        format!("content-length: {}\r\ncontent-length: 3\r\n", good.len()),
        "content-length: -1\r\n".to_owned(),
        "content-length: 99999999999999999999999\r\n".to_owned(),
        "content-length: abc\r\n".to_owned(),
        "transfer-encoding: gzip\r\n".to_owned(),
        "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n".to_owned(),
        format!("content-length: {}\r\n", good.len() + 50),
    ] {
        let mut bytes = format!("POST /v1/acquire HTTP/1.1\r\nhost: t\r\nconnection: close\r\nauthorization: Bearer attacker\r\n{head}\r\n").into_bytes();
        // Invalid lease so that even a lenient parse would not grant anything.
        bytes.extend_from_slice(
            format!(r#"{{"name":"victim","lease_ms":0,"wait_ms":0,"request_id":"{ID}"}}"#)
                .as_bytes(),
        );
        add(format!("framing {head:?}"), bytes);
    }
    add(
        "bad chunk size".into(),
        b"POST /v1/acquire HTTP/1.1\r\nhost: t\r\nconnection: close\r\nauthorization: Bearer attacker\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
    );
    // Unknown routes and methods.
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v2/acquire"),
        ("GET", "/v1/acquire"),
        ("DELETE", "/v1/acquire"),
        ("PUT", "/v1/release"),
        ("PATCH", "/v1/renew"),
        ("OPTIONS", "/v1/cancel"),
        ("TRACE", "/v1/acquire"),
        ("FOO", "/v1/acquire"),
        ("POST", "/v1/acquire/extra"),
        ("POST", "//v1/acquire"),
        ("POST", "/V1/ACQUIRE"),
        ("DELETE", "/v1/locks/victim"),
        ("POST", "/healthz"),
        ("POST", "/metrics"),
    ] {
        add(
            format!("{method} {path}"),
            request(
                method,
                path,
                &[("authorization", "Bearer attacker")],
                good.as_bytes(),
            ),
        );
    }
    // Garbage where a request should be.
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /v1/acquire HTTP/1.1\r\nhost: t\r\nbad header line\r\n\r\n",
        b"GET /v1/acquire HTTP/1.1\r\nhost: t\r\n: empty-name\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET \x7f HTTP/1.1\r\n\r\n",
    ] {
        add(
            format!("junk {:?}", String::from_utf8_lossy(junk)),
            junk.to_vec(),
        );
    }
    corpus
}

#[tokio::test]
async fn hostile_requests_get_4xx_or_a_clean_close_and_change_nothing() {
    let server =
        TestServer::start_with(|b| b.header_read_timeout(Duration::from_millis(500))).await;
    // Known state to compare against: a holder and a waiter, in the attacker's project too.
    let holder = server
        .client("attacker")
        .lock("victim")
        .expires_in(Duration::from_secs(120))
        .await
        .unwrap();
    let dl = server.client("attacker");
    let _waiter = tokio::spawn(async move { dl.lock("victim").await });
    support::eventually(Duration::from_secs(10), "waiter queued", || async {
        server.inspect("attacker", "victim").await.1 == 1
    })
    .await;
    let before = (
        server.inspect("attacker", "victim").await,
        server.metric("leasehold_held_locks").await,
        server.metric("leasehold_waiters").await,
    );
    assert_eq!(before.0, (Some(holder.fencing_token()), 1));

    let corpus = corpus();
    assert!(corpus.len() >= 100, "only {} requests", corpus.len());
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (what, bytes) in &corpus {
        let (status, body) = raw_bytes(server.addr, bytes).await;
        assert!(
            status == 0 || (400..500).contains(&status),
            "{what}: answered {status} {body}"
        );
        *by_status.entry(status).or_default() += 1;
        let now = (
            server.inspect("attacker", "victim").await,
            server.metric("leasehold_held_locks").await,
            server.metric("leasehold_waiters").await,
        );
        assert_eq!(now, before, "{what} changed the lock state");
    }
    println!(
        "{} hostile requests; answers by status (0 = closed): {by_status:?}",
        corpus.len()
    );
    assert!(holder.is_held());
}
