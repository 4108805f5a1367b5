//! A real headless browser for the tests: Debian's chromium driven through its chromedriver
//! over W3C WebDriver (plain HTTP on loopback: new session, navigate, execute script, delete
//! session). The browser runs as root, so without its sandbox (`--no-sandbox`), with a
//! profile of its own in a scratch directory; it reaches loopback only (every other host
//! goes to a proxy that refuses, and no name resolves). Dropping it ends the session, then
//! kills the driver and every process under it by pid, and removes the profile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Scratch;

/// The browser itself (not /usr/bin/chromium, a wrapper that adds flags and API keys).
pub const CHROMIUM: &str = "/usr/lib/chromium/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Fails the test, visibly, when chromium or its driver is not installed.
pub fn require_chromium() {
    for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing: run scripts/setup.sh (it installs Debian's {package})"
        );
    }
}

pub struct Browser {
    driver: Child,
    base: String,
    session: Option<String>,
    agent: ureq::Agent,
    profile: Scratch,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless chromium session through it.
    pub fn start() -> Browser {
        require_chromium();
        let profile = Scratch::new("chromium");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                profile.0.join("chromedriver.log").display()
            ))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: None,
            agent,
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .agent
                .get(&format!("{}/status", browser.base))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready in 20 s: {}",
                browser.driver_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let data_dir = browser.profile.0.join("profile");
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", data_dir.display()),
            "--window-size=1280,1000".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            // Nothing leaves the machine: no background fetches, and whatever else a page
            // or the browser would fetch goes to a proxy that refuses (loopback bypasses
            // proxies), with no name resolved.
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-domain-reliability".to_owned(),
            "--disable-client-side-phishing-detection".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-default-apps".to_owned(),
            "--disable-breakpad".to_owned(),
            "--metrics-recording-only".to_owned(),
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication"
                .to_owned(),
            "--proxy-server=http://127.0.0.1:9".to_owned(),
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".to_owned(),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session = browser.command("POST", "/session", Some(caps));
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {session}"))
            .to_owned();
        browser.session = Some(id);
        browser
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.profile.0.join("chromedriver.log")).unwrap_or_default()
    }

    /// One WebDriver command (`path` under the session when there is one, unless it starts
    /// with `/session` itself); its `value`. Panics with the driver's error.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = match &self.session {
            Some(id) if !path.starts_with("/session") => {
                format!("{}/session/{id}{path}", self.base)
            }
            _ => format!("{}{path}", self.base),
        };
        let request = self.agent.request(method, &url);
        let answer = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        let value: Value = match answer {
            Ok(r) => r.into_json().expect("a JSON answer"),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                panic!(
                    "WebDriver {method} {path}: {code} {text}\n{}",
                    self.driver_log()
                );
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        value["value"].clone()
    }

    /// Loads `url` (and waits for its load event).
    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs `script` (a function body: `return ...`) in the page; what it returns.
    pub fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Evaluates `script` every 200 ms until `done` accepts what it returns (which is then
    /// returned), for up to `limit`; panics with the last value and `what` otherwise.
    pub fn wait_for(
        &self,
        limit: Duration,
        script: &str,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(script);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; the page shows {v:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The browser's console: (level, message) of each entry since the last call.
    pub fn console(&self) -> Vec<(String, String)> {
        let logs = self.command("POST", "/se/log", Some(json!({"type": "browser"})));
        logs.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["level"].as_str().unwrap_or("").to_owned(),
                    e["message"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Where its profile and the driver's log are.
    pub fn dir(&self) -> PathBuf {
        self.profile.0.clone()
    }
}

/// Every process under `root` (children first found, then theirs), by /proc.
fn descendants(root: u32) -> Vec<i32> {
    let mut parent_of: HashMap<i32, i32> = HashMap::new();
    for pid in super::procfs::all_pids() {
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            });
        if let Some(ppid) = ppid {
            parent_of.insert(pid, ppid);
        }
    }
    let mut found = vec![root as i32];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| **pp == p)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            // Closes the browser; a driver that does not answer is killed below anyway.
            let _ = self
                .agent
                .delete(&format!("{}/session/{id}", self.base))
                .timeout(Duration::from_secs(10))
                .call();
        }
        // Whatever is left under the driver (all found before any dies, so that none is
        // reparented away first), then the driver.
        for pid in descendants(self.driver.id()) {
            // SAFETY: kill(2) with a pid of a process this browser started; harmless if
            // it is gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
