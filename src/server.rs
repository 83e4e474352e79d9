//! `qlorad serve`: open the store, requeue jobs a previous process left running, start the
//! workers and the HTTP server, and shut down gracefully (stop claiming, checkpoint, requeue).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::auth::{ApiKeys, AuthError};
use crate::api::{router, AppState};
use crate::config::Config;
use crate::jobs::{spawn_workers, EventHub, JobsError, Layout, Service, Store, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(
        "refusing to listen on {0} without API keys: set auth.api_keys_file (--api-keys-file), \
         listen on loopback, or pass --allow-anonymous to serve without keys anyway"
    )]
    NoKeys(std::net::SocketAddr),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serve on the configured address until `shutdown` is cancelled (a signal in `qlorad serve`).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_on(config, listener, shutdown).await
}

/// Serve on a bound listener (tests bind 127.0.0.1:0).
pub async fn serve_on(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let keys = ApiKeys::from_config(&config)?;
    let addr = listener.local_addr()?;
    if keys.is_empty() && !addr.ip().is_loopback() && !config.auth.allow_anonymous_remote {
        return Err(ServeError::NoKeys(addr));
    }
    if keys.is_empty() {
        info!("no API keys configured: one anonymous owner");
    } else {
        info!(keys = keys.len(), "API keys loaded");
    }
    let config = Arc::new(config);
    let layout = Layout::new(&config);
    let store = Store::open(layout.data_dir())
        .await?
        .with_webhooks(crate::jobs::webhooks::targets(&config.webhooks));
    layout.remove_staged_files();
    // This process owns the database: whatever is "running" belonged to a process that died.
    for (id, e) in store.requeue_stale(true).await? {
        info!(job.id = %id, seq = e.seq, "requeued");
    }
    let hub = EventHub::default();
    let workers = WorkerHandle {
        wake: Arc::new(Notify::new()),
        shutdown: shutdown.child_token(),
        stats: Default::default(),
    };
    let jobs = Service {
        config: config.clone(),
        store,
        hub,
        layout,
        workers,
    };
    let mut tasks = spawn_workers(&jobs);
    if !config.webhooks.is_empty() {
        tasks.push(tokio::spawn(crate::jobs::webhooks::run(
            jobs.store.clone(),
            config.webhooks.clone(),
            shutdown.child_token(),
        )));
    }
    let state = AppState {
        config: config.clone(),
        jobs,
        http_metrics: Default::default(),
        keys: Arc::new(keys),
        streams: Default::default(),
        inference: Arc::new(crate::jobs::inference::Inference::new(&config.inference)),
    };
    info!("listening on http://{}", listener.local_addr()?);
    let stop = shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    for t in tasks {
        let _ = t.await;
    }
    info!("stopped");
    Ok(())
}

/// A token cancelled by SIGINT or SIGTERM.
pub fn signal_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutting down: no new jobs; running jobs checkpoint and go back to the queue");
        t.cancel();
    });
    token
}
