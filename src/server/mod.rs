//! `Gateway`, the seam the binary, `sluice demo` and the tests all start:
//! it binds the client and admin listeners, runs the accept loop (stopping
//! at `max_connections`) and shuts down gracefully. Connections are driven
//! by `conn`, requests go through the service stack of `stack`, the admin
//! listener and the balance poller are `admin`'s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

mod admin;
mod conn;
mod send_timeout;
mod stack;

use crate::app::App;
use crate::config::{Config, Keys};
use admin::{poll_balance, serve_admin};
use conn::{serve_connection, Conn, Connections, Protocols};

/// A bound gateway, not yet serving.
pub struct Gateway {
    app: Arc<App>,
    listener: TcpListener,
    admin: TcpListener,
}

/// Controls a running gateway from outside (signals, tests).
#[derive(Clone)]
pub struct Handle {
    app: Arc<App>,
}

impl Handle {
    /// Applies a new, already validated config (SIGHUP). Returns the keys
    /// whose change was ignored (they cannot change in a running process;
    /// each was logged at warn).
    pub fn reload(&self, config: Config, keys: impl Into<Keys>) -> Vec<String> {
        let ignored = self.app.reload(config, &keys.into());
        self.app
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
        ignored
    }

    /// Counts a refused reload.
    pub fn reload_refused(&self) {
        self.app
            .metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }
}

impl Gateway {
    /// Binds both listeners. Nothing is served until `run`.
    pub async fn bind(config: Config, keys: impl Into<Keys>) -> std::io::Result<Gateway> {
        let keys = keys.into();
        let listener = TcpListener::bind(config.server.listen).await?;
        let admin = TcpListener::bind(config.server.admin_listen).await?;
        let app = Arc::new(App::new(config, &keys).await?);
        Ok(Gateway {
            app,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn handle(&self) -> Handle {
        Handle {
            app: Arc::clone(&self.app),
        }
    }

    /// Serves until `shutdown` completes, then drains: the listener closes
    /// (new connections are refused), `/readyz` answers 503, and in-flight
    /// requests get `shutdown_grace_secs` to finish; streams still running
    /// then end with the SSE error event.
    ///
    /// Connection settings (`header_read_timeout_secs`,
    /// `keepalive_timeout_secs`, `max_connections`) are read from the
    /// current snapshot at each accept, and the grace when shutdown begins,
    /// so a reload applies them to new connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            app,
            listener,
            admin,
        } = self;
        let admin_task = tokio::spawn(serve_admin(admin, Arc::clone(&app)));
        let poller = tokio::spawn(poll_balance(Arc::clone(&app)));

        let open = Arc::new(Connections::default());
        let (stop, stopping) = watch::channel(false);
        let mut protocols: Option<Arc<Protocols>> = None;

        tokio::pin!(shutdown);
        loop {
            let snap = app.snapshot.load_full();
            let server = &snap.config.server;
            // Past max_connections nothing is accepted: new connections wait
            // in the listen backlog until one closes.
            if open.count() >= server.max_connections {
                tokio::select! {
                    () = open.wait_below(server.max_connections) => continue,
                    () = &mut shutdown => break,
                }
            }
            let protocols = match &protocols {
                Some(p) if p.header_read_timeout == server.header_read_timeout => Arc::clone(p),
                _ => Arc::clone(
                    protocols.insert(Arc::new(Protocols::new(server.header_read_timeout))),
                ),
            };
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // briefly instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let conn = Conn {
                        _open: open.enter(),
                        stopping: stopping.clone(),
                        keepalive: server.keepalive_timeout,
                    };
                    serve_connection(protocols, conn, stream, Arc::clone(&app));
                }
                () = &mut shutdown => break,
            }
        }

        drop(listener);
        app.lifecycle.stop_accepting();
        // The grace as configured now: a reload may have changed it.
        let grace = app.snapshot.load().config.server.shutdown_grace;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: draining in-flight requests"
        );
        stop.send_replace(true);
        let began = tokio::time::Instant::now();
        tokio::select! {
            () = open.wait_below(1) => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!("shutdown grace over: ending the streams still running");
                app.lifecycle.end_grace();
                let _ = tokio::time::timeout(Duration::from_secs(5), open.wait_below(1)).await;
            }
        }
        poller.abort();
        admin_task.abort();
        // Charges Redis has not confirmed go there within the grace (at
        // least a moment, when the streams took all of it).
        let left = grace.saturating_sub(began.elapsed());
        app.limiter.drain(left.max(Duration::from_secs(2))).await;
        // Spend recorded during the drain is in the state file too.
        app.limiter.flush();
        tracing::info!("stopped");
    }
}
