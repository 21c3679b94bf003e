//! The deploy kit (`deploy/`): every metric its Grafana dashboard and Prometheus rules name
//! exists in a real server's `/metrics` (memory backend; etcd backend with the `etcd`
//! feature), and `promtool check rules` accepts the rules where Prometheus is installed.
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
#[cfg(feature = "etcd")]
use std::time::Duration;
use support::{TestServer, raw};

fn deploy_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `leasehold_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("leasehold_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The series names `/metrics` shows, and the families it declares (`# TYPE`, which an
/// empty labelled family shows alone): a family `f` stands for `f`, `f_total`, `f_bucket`,
/// `f_sum`, `f_count` and `f_created`.
fn exposed(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            let family = family.split(' ').next().unwrap_or_default();
            for suffix in ["", "_total", "_bucket", "_sum", "_count", "_created"] {
                names.insert(format!("{family}{suffix}"));
            }
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// `/metrics` after a few requests (so that labelled request counters have series).
async fn scrape(server: &TestServer) -> String {
    let auth = [("authorization", "Bearer deploy-test")];
    let _ = raw(server.addr, "GET", "/v1/locks", &auth, "").await;
    let _ = raw(server.addr, "GET", "/healthz", &[], "").await;
    metrics(server).await
}

async fn metrics(server: &TestServer) -> String {
    let (status, metrics) = raw(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    metrics
}

/// The dashboard's and the rules' metric names.
fn named() -> BTreeSet<String> {
    let dashboard = deploy_file("grafana-dashboard.json");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut names = metric_names(&dashboard);
    names.extend(metric_names(&deploy_file("prometheus-alerts.yml")));
    assert!(names.len() > 5, "{names:?}");
    names
}

#[tokio::test]
async fn dashboard_and_rules_name_only_metrics_the_server_has() {
    let server = TestServer::start().await;
    let mut have = exposed(&scrape(&server).await);
    server.stop().await;
    #[cfg(feature = "etcd")]
    {
        let mut server = TestServer::start_on(support::Backend::Etcd).await;
        have.extend(exposed(&scrape(&server).await));
        // Error counters have series only once a call failed: etcd gone, the health probe
        // fails (each probe bounded by 2 s) and counts its failed attempts.
        server.etcd.as_mut().expect("etcd").kill_all();
        support::eventually(Duration::from_secs(30), "/healthz says 503", || async {
            raw(server.addr, "GET", "/healthz", &[], "").await.0 == 503
        })
        .await;
        have.extend(exposed(&metrics(&server).await));
        server.stop().await;
    }
    let mut missing: Vec<String> = named().into_iter().filter(|n| !have.contains(n)).collect();
    if !cfg!(feature = "etcd") {
        // Only a server with the etcd backend has these.
        missing.retain(|n| !n.starts_with("leasehold_etcd_"));
    }
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
}

#[test]
fn promtool_accepts_the_rules() {
    let Ok(output) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus-alerts.yml"))
        .output()
    else {
        eprintln!("promtool is not installed (Debian: prometheus); rules not checked");
        return;
    };
    assert!(
        output.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit = deploy_file("leasehold-server.service");
    for setting in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=leasehold",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "PrivateTmp=yes",
    ] {
        assert!(unit.contains(setting), "the unit lacks {setting:?}");
    }
}
