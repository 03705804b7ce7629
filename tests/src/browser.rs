//! A small WebDriver client for the browser tests: Debian's headless Chromium driven
//! through chromedriver on loopback, speaking the W3C WebDriver protocol (JSON over plain
//! HTTP) with the workspace's `reqwest`.
//!
//! [`Driver::start`] starts chromedriver on a port it picks itself (`--port=0`, read back
//! from its first lines); each [`Session`] is one Chromium with its own profile directory,
//! so two sessions are two people with their own cookies. Dropping a session ends it
//! (Chromium quits); dropping the driver kills chromedriver's process group, so nothing is
//! left running when a test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::WAIT;

/// The W3C key of an element reference in WebDriver JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The WebDriver key code of Enter.
pub const ENTER: &str = "\u{E007}";
/// The fixed window size of every session.
pub const WINDOW: (u32, u32) = (1280, 800);

/// A running chromedriver, killed (with its process group) on drop.
pub struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
    chromium: PathBuf,
}

fn find_exe(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

impl Driver {
    /// Starts chromedriver, or answers `None` (after printing `skipped: chromium not found`)
    /// when Chromium or chromedriver is not installed; with `KITH_REQUIRE_BROWSER=1` that is
    /// an error instead.
    pub async fn start() -> anyhow::Result<Option<Arc<Driver>>> {
        let chromium = find_exe(&["chromium", "chromium-browser"]);
        let driver = find_exe(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("KITH_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
                bail!("KITH_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed");
            }
            println!("skipped: chromium not found");
            return Ok(None);
        };
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&driver)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let stdout = child.stdout.take().context("chromedriver stdout")?;
        // Read its lines on a thread: the port comes in one of the first lines, and the
        // rest must be drained so chromedriver never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(rest.trim_end_matches('.').trim().to_owned());
                }
            }
        });
        let mut this = Driver {
            child,
            base: String::new(),
            http: reqwest::Client::builder().no_proxy().build()?,
            chromium,
        };
        let port: u16 = rx
            .recv_timeout(Duration::from_secs(20))
            .context("chromedriver did not say which port it listens on")?
            .parse()
            .context("chromedriver's port")?;
        this.base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = this
                .http
                .get(format!("{}/status", this.base))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success());
            if ready == Some(true) {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver on port {port} did not answer /status");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(Arc::new(this)))
    }

    /// Opens a new Chromium with a fresh profile (no cookies) and the fixed window size.
    pub async fn session(self: &Arc<Self>) -> anyhow::Result<Session> {
        let profile = tempfile::tempdir()?;
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--hide-scrollbars".to_owned(),
            "--force-color-profile=srgb".to_owned(),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {"binary": self.chromium, "args": args},
        }}});
        let v = call(
            &self.http,
            "POST",
            &format!("{}/session", self.base),
            Some(caps),
        )
        .await?;
        let id = v["sessionId"]
            .as_str()
            .context("new session without sessionId")?
            .to_owned();
        let s = Session {
            driver: self.clone(),
            url: format!("{}/session/{id}", self.base),
            _profile: profile,
        };
        s.set_window(WINDOW.0, WINDOW.1).await?;
        Ok(s)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Sessions end Chromium themselves; this takes chromedriver and anything it left.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let req = match method {
        "GET" => http.get(url),
        "DELETE" => http.delete(url),
        _ => http.post(url).json(&body.unwrap_or_else(|| json!({}))),
    };
    let res = req
        .timeout(WAIT)
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = res.status();
    let v: Value = res.json().await.context("WebDriver answer")?;
    if !status.is_success() {
        bail!(
            "WebDriver {method} {url}: {} ({})",
            v["value"]["message"]
                .as_str()
                .unwrap_or("no message")
                .lines()
                .next()
                .unwrap_or(""),
            v["value"]["error"]
        );
    }
    Ok(v["value"].clone())
}

/// An element of the page, as WebDriver names it.
#[derive(Debug, Clone)]
pub struct Element(String);

/// One browser (one Chromium, one profile) driven by WebDriver; ended on drop.
pub struct Session {
    driver: Arc<Driver>,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Drop cannot await: end the session with a blocking request on a thread of its
        // own (a runtime's thread must not block on I/O), bounded by a timeout.
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let _ = delete_blocking(&url);
        })
        .join();
    }
}

/// `DELETE url` over a plain TCP connection with a short timeout (see [`Session`]'s drop).
fn delete_blocking(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_once('/').context("url path")?;
    let addr: std::net::SocketAddr = host.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}

impl Session {
    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        call(
            &self.driver.http,
            method,
            &format!("{}{path}", self.url),
            body,
        )
        .await
    }

    /// Loads `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    /// Reloads the page.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        self.cmd("POST", "/refresh", None).await?;
        Ok(())
    }

    /// The page's address now.
    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", "/url", None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Sets the window's outer size.
    pub async fn set_window(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and answers its value.
    pub async fn exec(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Polls `script` until it returns something other than null/false/"" (that value is
    /// answered), failing after [`WAIT`] with `what`.
    pub async fn wait_for(&self, what: &str, script: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.exec(script, vec![]).await?;
            let done = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if done {
                return Ok(v);
            }
            if Instant::now() > deadline {
                let banner = self
                    .exec(
                        "const b = document.querySelector('#banner'); return b && !b.hidden ? b.textContent : '';",
                        vec![],
                    )
                    .await
                    .unwrap_or_default();
                bail!("timed out after {WAIT:?} waiting for {what} (banner: {banner})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The element matching `css`, waiting for it to be there and visible.
    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let script = format!(
            "const e = document.querySelector({}); return !!(e && e.getClientRects().length);",
            serde_json::to_string(css)?
        );
        self.wait_for(&format!("`{css}` to be shown"), &script)
            .await?;
        self.element(css).await
    }

    /// The element matching `css` now, shown or not.
    async fn element(&self, css: &str) -> anyhow::Result<Element> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(Element(
            v[ELEMENT].as_str().context("element reference")?.to_owned(),
        ))
    }

    /// Clicks the element matching `css` (waiting for it).
    /// An element the app redrew between the lookup and the click is looked up again.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            let e = self.find(css).await?;
            match self
                .cmd("POST", &format!("/element/{}/click", e.0), None)
                .await
            {
                Ok(_) => return Ok(()),
                Err(err) if tries < 5 && err.to_string().contains("stale element") => tries += 1,
                Err(err) => return Err(err.context(format!("clicking `{css}`"))),
            }
        }
    }

    /// Types `text` into the element matching `css` (for a file input: a path).
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.send_keys(&e, text).await
    }

    /// Types `text` into `e`.
    pub async fn send_keys(&self, e: &Element, text: &str) -> anyhow::Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    /// Gives a file to an `<input type=file>` (which may be hidden) by its path.
    pub async fn upload(&self, css: &str, path: &Path) -> anyhow::Result<()> {
        let e = self.element(css).await?;
        self.send_keys(&e, &path.display().to_string()).await
    }

    /// The first cookie of the current page whose name starts with `prefix`, as
    /// `name=value` (WebDriver reads HttpOnly cookies too).
    pub async fn cookie_starting(&self, prefix: &str) -> anyhow::Result<String> {
        let v = self.cmd("GET", "/cookie", None).await?;
        let found = v
            .as_array()
            .context("cookie list")?
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .with_context(|| format!("no cookie named {prefix}…"))?;
        Ok(format!(
            "{}={}",
            found["name"].as_str().unwrap_or_default(),
            found["value"].as_str().unwrap_or_default()
        ))
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use data_encoding::BASE64;
        let v = self.cmd("GET", "/screenshot", None).await?;
        let png = BASE64.decode(v.as_str().context("screenshot data")?.as_bytes())?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}
