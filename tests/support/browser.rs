//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`;
//! `.ci/install` installs them). A missing `chromedriver` fails the test: it must not pass
//! without having looked at the page.

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A chromedriver process and one browser session; both end on drop.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless session, waiting at most
    /// `bound` for each.
    pub async fn start(bound: Duration) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // A group of its own, with the browser it starts: a failed test kills them all.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `chromedriver` ({e}): the console's browser tests need \
                     Debian's chromium and chromium-driver (run .ci/install, or \
                     `apt-get install chromium chromium-driver`)"
                )
            });
        let profile =
            std::env::temp_dir().join(format!("leasehold-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut browser_options = serde_json::json!({
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            browser_options["binary"] = "/usr/bin/chromium".into();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), "chrome".into());
        capabilities.insert("goog:chromeOptions".into(), browser_options);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + bound;
        // chromedriver listens a moment after it starts: retry the session until then.
        let client = loop {
            let attempt = ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await;
            match attempt {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no browser session within {bound:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        Browser {
            client,
            driver,
            profile,
        }
    }

    /// The text of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut texts = Vec::new();
        for element in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            // An element replaced meanwhile (the table re-renders) is simply skipped.
            if let Ok(text) = element.text().await {
                texts.push(text);
            }
        }
        texts
    }

    /// The result of a script, as JSON.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("the script runs")
    }

    /// Ends the session (and the browser), then the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// Also when a test fails: no driver or profile is left behind.
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative pid signals that process group: the driver's own
        // (it leads it), which holds the browser too.
        unsafe { libc::kill(-(self.driver.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
