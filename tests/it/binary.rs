//! The real `sluice` binary: CLI commands, start-up failures, JSON logs,
//! SIGHUP reload and SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_LISTEN")
        .env_remove("SLUICE_ADMIN_LISTEN")
        .env_remove("SLUICE_UPSTREAM_URL");
    c
}

fn temp_config(text: &str) -> TempFile {
    TempFile::new(text)
}

/// The value of the first `name value` line of `text` that starts with
/// `name`, trimmed.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

#[test]
fn version_new_key_and_hash_key() {
    let out = sluice().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let out = sluice().arg("new-key").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let key = field(&text, "key:").expect("key line");
    let hash = field(&text, "key_sha256:").expect("hash line");
    let random = key.strip_prefix("sk-sluice-").expect("prefix");
    assert!(random.len() >= 32 && random.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(hash, sha(key));

    let out = sluice().args(["hash-key", "sk-abc"]).output().expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sha("sk-abc"));
    let mut child = sluice()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"sk-abc\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha("sk-abc"),
        "trailing newline stripped"
    );
}

#[test]
fn check_config_reports_and_exits() {
    let good = temp_config(&config_text("http://127.0.0.1:1", ""));
    let out = sluice()
        .args(["check-config", "--config"])
        .arg(&good.0)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alpha") && text.contains("beta") && text.contains("cache"),
        "{text}"
    );

    let bad = temp_config(
        &config_text("http://127.0.0.1:1", "")
            .replace("max_retries = 2", "max_retries = 2\nmax_retires = 3"),
    );
    let out = sluice()
        .args(["check-config", "--config"])
        .arg(&bad.0)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_retires"));

    // SLUICE_CONFIG names the file too. The shipped example grants no
    // access with a known key: its keys are placeholders, refused with the
    // command that makes a real one, at check-config and at start-up.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.toml");
    let out = sluice()
        .arg("check-config")
        .env("SLUICE_CONFIG", example)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key_sha256") && err.contains("sluice new-key"),
        "{err}"
    );
    let out = sluice()
        .args(["--config", example])
        .env("DEEPSEEK_API_KEY", "sk-x")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sluice new-key"));
}

#[test]
fn start_up_fails_without_the_upstream_key() {
    let cfg = temp_config(&config_text("http://127.0.0.1:1", ""));
    let out = sluice()
        .arg("--config")
        .arg(&cfg.0)
        .env_remove("TEST_UPSTREAM_KEY")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TEST_UPSTREAM_KEY"));
    let bad = temp_config("[[tenants]]\nname = \"x\"\nkey_sha256 = \"nothex\"\n");
    let out = sluice().arg("--config").arg(&bad.0).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_sha256"));
}

#[test]
fn several_upstreams_are_listed_and_each_needs_its_key() {
    let text = config_text("http://127.0.0.1:1", "").replace(
        "[upstream]\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"TEST_UPSTREAM_KEY\"\n",
        "[upstream]\n",
    ) .replace("balance_poll_secs = 0\n", "")
        + "[[upstreams]]\nname = \"acct-a\"\nbase_url = \"http://127.0.0.1:1\"\napi_key_env = \"KEY_A\"\n\
           [[upstreams]]\nname = \"reseller\"\nbase_url = \"http://127.0.0.1:2\"\napi_key_env = \"KEY_R\"\n\
           tier = 1\nweight = 2\nmodels = [\"deepseek-chat\"]\nmodel_map = { \"deepseek-chat\" = \"ds-v3\" }\n";
    let cfg = temp_config(&text);
    let out = sluice()
        .args(["check-config", "--config"])
        .arg(&cfg.0)
        .env_remove("KEY_A")
        .env_remove("KEY_R")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("a line for {name}: {stdout}"))
            .to_string()
    };
    assert!(line("acct-a").contains("tier 0, weight 1"), "{stdout}");
    let reseller = line("reseller");
    assert!(reseller.contains("tier 1, weight 2"), "{reseller}");
    assert!(reseller.contains("deepseek-chat (as ds-v3)"), "{reseller}");
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("upstreams.acct-a.api_key_env") && warned.contains("KEY_R"),
        "{warned}"
    );
    // Start-up needs every upstream's key, and names the one missing.
    let out = sluice()
        .arg("--config")
        .arg(&cfg.0)
        .env("KEY_A", "sk-a")
        .env_remove("KEY_R")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstreams.reseller.api_key_env") && err.contains("KEY_R"),
        "{err}"
    );
    assert!(!err.contains("KEY_A"), "{err}");
    // SLUICE_UPSTREAM_URL overrides [upstream].base_url only: an error here.
    let out = sluice()
        .arg("--config")
        .arg(&cfg.0)
        .env("KEY_A", "sk-a")
        .env("KEY_R", "sk-r")
        .env("SLUICE_UPSTREAM_URL", "http://127.0.0.1:3")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLUICE_UPSTREAM_URL"));
}

#[test]
fn a_ca_file_certificate_that_does_not_parse_is_a_config_error() {
    // A PEM block labelled CERTIFICATE whose contents are not an X.509
    // certificate: check-config and start-up refuse the config, naming the
    // key, rather than start-up failing later in the TLS setup.
    let ca = TempFile::new(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let cfg = temp_config(&config_text("https://localhost:1", "").replace(
        "[upstream]\n",
        &format!("[upstream]\nca_file = \"{}\"\n", ca.0.display()),
    ));
    let out = sluice()
        .args(["check-config", "--config"])
        .arg(&cfg.0)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("invalid config"), "{err}");
    assert!(
        err.contains("upstream.ca_file") && err.contains("does not parse"),
        "{err}"
    );

    let out = sluice()
        .arg("--config")
        .arg(&cfg.0)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid config") && err.contains("upstream.ca_file"),
        "{err}"
    );
}

#[test]
fn start_up_without_a_config_says_where_to_mount_one() {
    // The container image holds no config: started bare, it must exit 1 and
    // say where the config goes.
    let out = sluice()
        .env("SLUICE_CONFIG", "/nonexistent/sluice/sluice.toml")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/sluice/sluice.toml"), "{err}");
    assert!(err.contains("mount yours at that path"), "{err}");
}

fn signal(pid: &str, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill")
        .success());
}

/// Waits for the log line whose message is `want`.
async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    want: &str,
) -> Result<serde_json::Value, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = rx.recv().await.expect("log line");
            if v["message"] == want {
                return v;
            }
        }
    })
    .await
}

#[tokio::test]
async fn runs_logs_json_reloads_on_sighup_and_stops_on_sigterm() {
    let sim = sluice::simulator::Simulator::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("sim");
    let text = config_text(&sim.base_url(), "");
    let cfg = temp_config(&text);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&cfg.0)
        .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        .env("SLUICE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    std::thread::spawn(move || {
        let std_err = stderr.into_owned_fd().expect("fd");
        for line in BufReader::new(std::fs::File::from(std_err)).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("log line is not JSON: {line}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let listening = next(&mut rx, "sluice listening").await.expect("started");
    let addr = listening["listen"].as_str().expect("listen").to_string();
    let url = format!("http://{addr}/v1/chat/completions");

    let r = call(&url, ALPHA, &chat("secret prompt text"), &[]).await;
    assert_eq!(r.status, 200);
    let access = next(&mut rx, "request").await.expect("access line");
    for field in [
        "request_id",
        "tenant",
        "model",
        "endpoint",
        "status",
        "cache",
        "duration_ms",
        "upstream_status",
    ] {
        assert!(access.get(field).is_some(), "{field} in {access}");
    }
    assert_eq!(access["tenant"], "alpha");
    assert_eq!(access["status"], 200);
    assert_eq!(
        access["upstream"], "default",
        "the upstream of the last attempt"
    );
    let line = access.to_string();
    assert!(
        !line.contains("secret prompt") && !line.contains(ALPHA) && !line.contains(UPSTREAM_KEY)
    );
    assert!(!line.contains("simulated answer"), "no completion in logs");

    // The container health check probes the admin listener.
    let admin = listening["admin"].as_str().expect("admin").to_string();
    let out = sluice()
        .args(["healthcheck", "--admin", &admin])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An invalid file is refused and the running config stays.
    cfg.write("this is = not [valid");
    let pid = child.id().expect("pid").to_string();
    signal(&pid, "-HUP");
    next(&mut rx, "config reload refused; keeping the running config")
        .await
        .expect("refusal logged");
    assert_eq!(call(&url, ALPHA, &chat("still up"), &[]).await.status, 200);

    // A valid file without beta: beta's key stops working at once.
    let without_beta = text.replace(&sha(BETA), &sha("sk-other-0123456789"));
    cfg.write(&without_beta);
    signal(&pid, "-HUP");
    next(&mut rx, "config reloaded")
        .await
        .expect("reload logged");
    assert_eq!(call(&url, BETA, &chat("beta"), &[]).await.status, 401);

    // A key a running process cannot change is named at warn, and the
    // reload does not report it applied.
    cfg.write(&format!("{without_beta}\n[cache]\nmax_bytes = 1000\n"));
    signal(&pid, "-HUP");
    let warned = next(
        &mut rx,
        "these settings cannot change in a running process; the change is ignored until a restart",
    )
    .await
    .expect("warn line");
    assert_eq!(warned["level"], "WARN");
    assert_eq!(warned["keys"], "cache.max_bytes");
    let reloaded = next(&mut rx, "config reloaded")
        .await
        .expect("reload logged");
    assert_eq!(reloaded["not_applied"], "cache.max_bytes");

    signal(&pid, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn demo_serves_a_working_key_without_any_setup() {
    // One worker: tokio's single-threaded scheduler (main thread and the log
    // writer); more: the multi-threaded one.
    assert_eq!(demo_with_workers("1").await, 2);
    assert_eq!(demo_with_workers("2").await, 4);
}

/// Runs `sluice demo` with `TOKIO_WORKER_THREADS=workers` through a stream
/// and a SIGINT; returns its thread count while serving.
async fn demo_with_workers(workers: &str) -> usize {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("demo")
        .env("TOKIO_WORKER_THREADS", workers)
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .env("SLUICE_ADMIN_LISTEN", "127.0.0.1:0")
        .env_remove("DEEPSEEK_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let (mut key, mut base, mut curl, mut anthropic) = (None, None, false, None);
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("demo prints")
    {
        if let Some(k) = line.strip_prefix("key:") {
            key = Some(k.trim().to_string());
        }
        if let Some(b) = line.strip_prefix("base URL:") {
            base = Some(b.trim().to_string());
        }
        curl |= line.starts_with("curl ");
        if let Some(rest) = line.strip_prefix("ANTHROPIC_BASE_URL=") {
            anthropic = rest.split_whitespace().next().map(str::to_string);
            assert!(line.contains("ANTHROPIC_AUTH_TOKEN=sk-sluice-"), "{line}");
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    let (key, base) = (key.expect("a key"), base.expect("a base URL"));
    assert!(key.starts_with("sk-sluice-") && curl);
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{base}"
    );
    let r = call(
        &format!("{base}/chat/completions"),
        &key,
        &chat_stream("hello demo"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    let upstream = r.header("x-sluice-upstream");
    assert!(
        upstream == "sim-a" || upstream == "sim-b",
        "two simulated accounts: {upstream:?}"
    );
    // The ANTHROPIC_BASE_URL line works as Claude Code would use it.
    let anthropic = anthropic.expect("an ANTHROPIC_BASE_URL line");
    let r = call(
        &format!("{anthropic}/v1/messages?beta=true"),
        &key,
        &serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["type"], "message");
    let pid = child.id().expect("pid").to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let threads = field(&status, "Threads:")
        .and_then(|n| n.parse().ok())
        .expect("thread count");
    signal(&pid, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGINT drains and exits 0 like SIGTERM"
    );
    threads
}
