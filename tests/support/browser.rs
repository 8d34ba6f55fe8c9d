//! A real browser for the console's tests: headless Chromium driven through ChromeDriver's
//! W3C WebDriver protocol (JSON over HTTP), with no client library between the test and
//! the browser. `scripts/install-chromium` installs both; `HANDOFF_CHROMEDRIVER` and
//! `HANDOFF_CHROMIUM` say where they are (else /usr/bin/chromedriver, /usr/bin/chromium).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use base64::Engine as _;
use handoff_testkit::{until, Child};
use serde_json::{json, Value};

use crate::http::http_request;

/// The W3C name of an element's id in a reply.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session: the driver process, its session, and where screenshots go.
pub struct Browser {
    addr: SocketAddr,
    session: String,
    shots: PathBuf,
    _profile: tempfile::TempDir,
    _driver: Child,
}

fn program(var: &str, default: &str) -> Result<PathBuf> {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
    if !path.exists() {
        bail!(
            "{} is missing: run scripts/install-chromium (or set {var})",
            path.display()
        );
    }
    Ok(path)
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium session; screenshots go to `shots`.
    pub async fn start(shots: &Path) -> Result<Browser> {
        let driver_bin = program("HANDOFF_CHROMEDRIVER", "/usr/bin/chromedriver")?;
        let chromium = program("HANDOFF_CHROMIUM", "/usr/bin/chromium")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let profile = tempfile::tempdir()?;
        let log = profile.path().join("chromedriver.log");
        let driver = Child::spawn(
            "chromedriver",
            Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let ready = until(
            "ChromeDriver to be ready",
            Duration::from_secs(30),
            || async {
                let status = http_request(addr, "GET", "/status", &[("Host", "localhost")], b"");
                Ok(status
                    .ok()
                    .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
                    .filter(|v| v["value"]["ready"] == json!(true)))
            },
        )
        .await;
        if let Err(e) = ready {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let last = http_request(addr, "GET", "/status", &[("Host", "localhost")], b"");
            bail!("{e}: {last:?}\n{said}");
        }
        let args = json!([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            format!("--user-data-dir={}", profile.path().display()),
        ]);
        let created = call(
            addr,
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": chromium, "args": args },
            }}}),
        )?;
        let session = created["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session in {created}"))?
            .to_owned();
        std::fs::create_dir_all(shots)?;
        Ok(Browser {
            addr,
            session,
            shots: shots.to_owned(),
            _profile: profile,
            _driver: driver,
        })
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        call(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    /// Opens `url` and waits for it to load.
    pub fn open(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", json!({ "url": url }))?;
        Ok(())
    }

    /// The address the browser shows.
    pub fn url(&self) -> Result<String> {
        Ok(self
            .call("GET", "/url", Value::Null)?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The elements `css` selects (none is no error).
    pub fn all(&self, css: &str) -> Result<Vec<String>> {
        let found = self.call(
            "POST",
            "/elements",
            json!({ "using": "css selector", "value": css }),
        )?;
        Ok(found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The one element `css` selects first.
    pub fn find(&self, css: &str) -> Result<String> {
        self.all(css)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("nothing on the page matches {css}"))
    }

    pub fn click(&self, element: &str) -> Result<()> {
        self.call("POST", &format!("/element/{element}/click"), json!({}))?;
        Ok(())
    }

    /// Types `text` into a field.
    pub fn type_into(&self, element: &str, text: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )?;
        Ok(())
    }

    /// The text an element shows.
    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self
            .call("GET", &format!("/element/{element}/text"), Value::Null)?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The value of a script run in the page.
    pub fn script(&self, js: &str) -> Result<Value> {
        self.call("POST", "/execute/sync", json!({ "script": js, "args": [] }))
    }

    /// Saves what the browser shows as `name`.png; its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let shot = self.call("GET", "/screenshot", Value::Null)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().ok_or_else(|| anyhow!("no screenshot"))?)?;
        if !png.starts_with(b"\x89PNG") {
            bail!("the screenshot is not a PNG");
        }
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closes Chromium; the driver dies with its Child.
        let _ = self.call("DELETE", "", Value::Null);
    }
}

/// One WebDriver call: its `value`, or the driver's error.
fn call(addr: SocketAddr, method: &str, path: &str, body: Value) -> Result<Value> {
    let payload = match body {
        Value::Null => Vec::new(),
        body => serde_json::to_vec(&body)?,
    };
    let mut headers = vec![("Host", "localhost")];
    if !payload.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    let r = http_request(addr, method, path, &headers, &payload)
        .with_context(|| format!("WebDriver {method} {path}"))?;
    let mut v: Value = serde_json::from_str(&r.body)
        .with_context(|| format!("WebDriver {method} {path}: {}", r.body))?;
    if r.status != 200 {
        bail!("WebDriver {method} {path}: {} {}", r.status, v["value"]);
    }
    Ok(v["value"].take())
}
