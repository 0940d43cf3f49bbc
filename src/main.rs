//! The `sluice` binary: CLI (clap), logging, signals. Everything else is the
//! library: this file starts a `Gateway` and feeds it SIGTERM and SIGHUP.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::{tenant, Config, Gateway, Keys};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A gateway that shares one LLM API key among many teams."
)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "SLUICE_CONFIG",
        default_value = "config/sluice.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print a summary; exit 1 if invalid.
    CheckConfig,
    /// Print a fresh tenant key and its SHA-256.
    NewKey,
    /// Print the SHA-256 of a key (given, or read from stdin).
    HashKey { key: Option<String> },
    /// Try Sluice without an API key: a simulated upstream behind the gateway.
    Demo,
    /// Exit 0 if the admin listener's /healthz answers 200 (for container
    /// health checks in images without curl).
    Healthcheck {
        /// Admin address; default: `server.admin_listen` of the config
        /// (an unspecified IP means 127.0.0.1).
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Run only the simulated DeepSeek upstream (for tests and benchmarks).
    #[command(hide = true)]
    Simulate {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Its name: `x-sim-upstream: NAME` aims the fault headers at it.
        #[arg(long, default_value = "")]
        name: String,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::NewKey) => new_key(),
        Some(Command::HashKey { key }) => hash_key(key),
        Some(Command::CheckConfig) => check_config(&cli.config),
        Some(Command::Healthcheck { admin }) => healthcheck(admin, &cli.config),
        Some(Command::Demo) => {
            let _logs = init_logging();
            runtime().block_on(demo())
        }
        Some(Command::Simulate { listen, name }) => {
            let _logs = init_logging();
            runtime().block_on(simulate(listen, &name))
        }
        None => {
            let _logs = init_logging();
            runtime().block_on(run(cli.config))
        }
    }
}

/// One worker per CPU (`TOKIO_WORKER_THREADS` overrides). With a single
/// worker there is nothing to steal work from, so the runtime is tokio's
/// single-threaded scheduler, which skips the cross-thread bookkeeping of
/// the multi-threaded one: about a microsecond less CPU per proxied request
/// (benches/README.md).
fn runtime() -> tokio::runtime::Runtime {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Logs go to stderr through a background writer thread, so a slow log
/// consumer never blocks the runtime. Under sustained overload the writer's
/// queue (16k lines; its slots are allocated up front) drops lines rather
/// than stall requests. The guard flushes what is queued when `main` returns.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(16 * 1024)
        .finish(Batched::new());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if env("SLUICE_LOG_FORMAT").as_deref() == Some("json") {
        builder.event_format(sluice::log::JsonLines).init();
    } else {
        builder
            .with_ansi(false)
            .fmt_fields(sluice::log::TextFields)
            .init();
    }
    guard
}

/// How long the log writer thread rests after writing out a batch.
const LOG_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// The log writer thread's output: stderr behind a 64 KiB buffer, written
/// out once per batch the thread takes off its queue (one `write` for many
/// lines, where stderr alone makes one a line), after which the thread
/// rests `LOG_GATHER`. While it rests, lines gather on the queue without
/// waking it: under load the access log costs one `write` per batch rather
/// than one per request, and the thread wakes about half as often (context
/// switches: 2 500 rather than 5 000 over 42 000 requests on one core). A
/// lone line is still written at once; behind a busy spell a line waits at
/// most `LOG_GATHER`.
struct Batched {
    out: std::io::BufWriter<std::io::Stderr>,
}

impl Batched {
    fn new() -> Batched {
        Batched {
            out: std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()),
        }
    }
}

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    /// Called by the writer thread once its queue is empty (and at exit).
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        std::thread::sleep(LOG_GATHER);
        Ok(())
    }
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn new_key() -> ExitCode {
    let key = tenant::new_key();
    out(&format!(
        "key:        {key}\nkey_sha256: {}\n",
        hex::encode(tenant::key_sha256(key.as_bytes()))
    ));
    ExitCode::SUCCESS
}

fn hash_key(key: Option<String>) -> ExitCode {
    let key = match key {
        Some(k) => k,
        None => {
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).is_err() {
                eprintln!("sluice: could not read a key from stdin");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    if key.is_empty() {
        eprintln!("sluice: the key is empty");
        return ExitCode::FAILURE;
    }
    out(&format!(
        "{}\n",
        hex::encode(tenant::key_sha256(key.as_bytes()))
    ));
    ExitCode::SUCCESS
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path, env) {
        Ok(config) => {
            out(&format!("{}: valid\n{config}", path.display()));
            if let Err(e) = config.upstream_keys(env) {
                for problem in &e.0 {
                    eprintln!("warning: {problem}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid config:", path.display());
            for problem in &e.0 {
                eprintln!("  - {problem}");
            }
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(admin: Option<SocketAddr>, path: &Path) -> ExitCode {
    use std::io::Read;
    let addr = match admin {
        Some(a) => a,
        None => match Config::load(path, env) {
            Ok(c) => c.server.admin_listen,
            Err(e) => {
                eprintln!("sluice: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let probe = || -> std::io::Result<bool> {
        let timeout = std::time::Duration::from_secs(3);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(&head[9..12] == b"200")
    };
    match probe() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("sluice: {addr}/healthz did not answer 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sluice: {addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<(Config, Keys), String> {
    let config =
        Config::load(path, env).map_err(|e| format!("invalid config {}: {e}", path.display()))?;
    let keys = config.upstream_keys(env).map_err(|e| e.to_string())?;
    Ok((config, keys))
}

async fn run(path: PathBuf) -> ExitCode {
    let (config, keys) = match load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    serve(config, keys, Some(path)).await
}

/// Runs a gateway until SIGTERM/SIGINT; SIGHUP reloads `path`.
async fn serve(config: Config, keys: Keys, path: Option<PathBuf>) -> ExitCode {
    let gateway = match Gateway::bind(config, keys).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %gateway.local_addr(), admin = %gateway.admin_addr(), "sluice listening");
    let handle = gateway.handle();
    if let Some(path) = path {
        tokio::spawn(reload_on_sighup(handle, path));
    }
    serve_on_worker(gateway).await
}

/// Runs the gateway on a runtime worker rather than on the thread blocked on
/// the runtime: a new connection is then accepted and served by the same
/// thread, without waking another one.
async fn serve_on_worker(gateway: Gateway) -> ExitCode {
    match tokio::spawn(gateway.run(shutdown_signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gateway stopped: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn reload_on_sighup(handle: sluice::Handle, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match load(&path) {
            Ok((config, keys)) => {
                let ignored = handle.reload(config, keys);
                if ignored.is_empty() {
                    tracing::info!(path = %path.display(), "config reloaded");
                } else {
                    // Never reported as applied: the warn line named them.
                    tracing::info!(
                        path = %path.display(),
                        not_applied = %ignored.join(", "),
                        "config reloaded"
                    );
                }
            }
            Err(e) => {
                handle.reload_refused();
                tracing::error!(error = %e, "config reload refused; keeping the running config");
            }
        }
    }
}

async fn simulate(listen: SocketAddr, name: &str) -> ExitCode {
    let sim = match sluice::simulator::Simulator::start_named(listen, name).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    out(&format!("simulator listening on {}\n", sim.base_url()));
    shutdown_signal().await;
    ExitCode::SUCCESS
}

async fn demo() -> ExitCode {
    // Two simulated accounts, so failover and ejection can be tried too
    // (`x-sim-upstream: sim-a` aims a fault header at one of them).
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let sims = match (
        sluice::simulator::Simulator::start_named(local, "sim-a").await,
        sluice::simulator::Simulator::start_named(local, "sim-b").await,
    ) {
        (Ok(a), Ok(b)) => [a, b],
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot start the simulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let key = tenant::new_key();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
shutdown_grace_secs = 5

[upstream]
eject_after = 3
eject_secs = 10

[[upstreams]]
name = "sim-a"
base_url = "{}"
api_key_env = ""
balance_poll_secs = 30

[[upstreams]]
name = "sim-b"
base_url = "{}"
api_key_env = ""
balance_poll_secs = 30

[[tenants]]
name = "demo"
key_sha256 = ["{}"]
requests_per_minute = 600
tokens_per_minute = 1000000
max_concurrent = 32

[pricing.deepseek-chat]
input_cache_hit = 0.028
input_cache_miss = 0.28
output = 0.42

# Claude Code and the Anthropic SDKs send claude-* model names.
[pricing.default]
input_cache_hit = 0.028
input_cache_miss = 0.28
output = 0.42
"#,
        sims[0].base_url(),
        sims[1].base_url(),
        hex::encode(tenant::key_sha256(key.as_bytes()))
    );
    // The env overrides apply; the upstream stays the simulator.
    let config = match Config::parse(&text, |name| {
        if name == "SLUICE_UPSTREAM_URL" {
            None
        } else {
            env(name)
        }
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let gateway = match Gateway::bind(config, Keys::default()).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = gateway.local_addr();
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let base = format!("http://{host}:{}/v1", addr.port());
    let anthropic = format!("http://{host}:{}/anthropic", addr.port());
    out(&format!(
        "Sluice demo: two simulated DeepSeek accounts (sim-a, sim-b) behind the gateway.\n\n\
         key:      {key}\n\
         base URL: {base}\n\
         metrics:  http://{}/metrics\n\n\
         For Claude Code and the Anthropic SDKs (Messages API):\n\
         ANTHROPIC_BASE_URL={anthropic} ANTHROPIC_AUTH_TOKEN={key}\n\n\
         curl {base}/chat/completions \\\n  \
         -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n  \
         -d '{{\"model\":\"deepseek-chat\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"stream\":true}}'\n\n\
         Ctrl-C stops it.\n",
        gateway.admin_addr()
    ));
    let code = serve_on_worker(gateway).await;
    drop(sims);
    code
}
