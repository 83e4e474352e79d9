//! `qlorad serve`: open the store, requeue jobs a previous process left running, start the
//! workers and the HTTP server, and shut down gracefully (stop claiming, checkpoint, requeue).
//! `qlorad worker`: the same without HTTP. On PostgreSQL any number of each share one queue;
//! events a worker stores reach the followers of every API process through `LISTEN/NOTIFY`
//! ([`relay_events`]).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::auth::{ApiKeys, AuthError};
use crate::api::{router, AppState};
use crate::config::Config;
use crate::jobs::store::Backend;
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
    #[error("a worker process needs workers: --workers cpu,cuda:0,…")]
    NoWorkers,
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
    let jobs = open_service(config.clone(), &shutdown, true).await?;
    let mut tasks = spawn_workers(&jobs);
    if jobs.store.backend == Backend::Postgres {
        let url = config.storage.database_url.clone().unwrap_or_default();
        tasks.push(tokio::spawn(relay_events(
            url,
            jobs.clone(),
            shutdown.child_token(),
        )));
    }
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

/// Run workers alone until `shutdown` is cancelled (`qlorad worker`).
pub async fn work(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    if config.workers.devices.is_empty() {
        return Err(ServeError::NoWorkers);
    }
    let jobs = open_service(Arc::new(config), &shutdown, false).await?;
    if jobs.store.backend == Backend::Sqlite {
        tracing::warn!(
            "a worker process on SQLite shares the queue only with processes on this host; \
             several hosts need --database-url postgres://…"
        );
    }
    info!(workers = jobs.config.workers.devices.len(), "working");
    for t in spawn_workers(&jobs) {
        let _ = t.await;
    }
    info!("stopped");
    Ok(())
}

/// The store, the layout and the workers' handle of one process. Running jobs whose lease has
/// run out go back to the queue; an API process on SQLite owns the database, so every running
/// job there belonged to a process that died.
async fn open_service(
    config: Arc<Config>,
    shutdown: &CancellationToken,
    api: bool,
) -> Result<Service, ServeError> {
    for name in &config.ignored_env {
        tracing::warn!(variable = %name, "ignored: names no section of the configuration");
    }
    let layout = Layout::new(&config);
    let store = Store::connect(config.storage.database_url.as_deref(), layout.data_dir())
        .await?
        .with_webhooks(crate::jobs::webhooks::targets(&config.webhooks));
    let owns_database = api && store.backend == Backend::Sqlite;
    let upload_limit = std::time::Duration::from_secs(config.limits.upload_timeout_seconds);
    layout.remove_staged_files((!owns_database).then_some(upload_limit));
    for (id, e) in store.requeue_stale(owns_database).await? {
        info!(job.id = %id, seq = e.seq, "requeued");
    }
    let workers = WorkerHandle {
        wake: Arc::new(Notify::new()),
        shutdown: shutdown.child_token(),
        stats: Default::default(),
    };
    let objects = match &config.storage.object_store {
        Some(url) => Some(
            crate::jobs::objects::Objects::open(url, layout.data_dir())
                .map_err(JobsError::Config)?,
        ),
        None => None,
    };
    Ok(Service {
        config,
        store,
        hub: EventHub::default(),
        layout,
        objects,
        workers,
    })
}

/// Hand the events other processes store to this process's followers: each `qlorad_events`
/// notification (`<job> <seq>`, sent by the database when the event's transaction commits)
/// for a followed job is read back and published; followers skip what they already have and
/// fill gaps from the store. After a lost connection every followed job's newest event is
/// published again, so nothing sent meanwhile is missed. Queued jobs are announced too: a
/// `queued` status event wakes this process's workers.
pub async fn relay_events(url: String, svc: Service, shutdown: CancellationToken) {
    use sqlx::postgres::PgListener;
    let mut listener = loop {
        let attempt = async {
            let mut l = PgListener::connect(&url).await?;
            l.listen("qlorad_events").await?;
            Ok::<_, sqlx::Error>(l)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => match r {
                Ok(l) => {
                    info!("listening for events from other processes");
                    break l;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for events; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            },
        }
    };
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = listener.try_recv() => n,
        };
        match n {
            Ok(Some(n)) => {
                let mut parts = n.payload().split(' ');
                let (Some(job), Some(Ok(seq))) =
                    (parts.next(), parts.next().map(str::parse::<i64>))
                else {
                    continue;
                };
                if parts.next() == Some("queued") {
                    svc.workers.wake.notify_waiters();
                }
                tracing::debug!(job.id = %job, seq, followed = svc.hub.is_followed(job), "event stored");
                if !svc.hub.is_followed(job) {
                    continue;
                }
                match svc.store.events(job, seq - 1, 1).await {
                    Ok(events) => events.iter().for_each(|e| svc.hub.publish(job, e)),
                    Err(e) => tracing::warn!(error = %e, job.id = %job, "relaying an event"),
                }
            }
            // The connection dropped; `try_recv` reconnects on the next call.
            Ok(None) => {
                for job in svc.hub.followed() {
                    if let Ok(events) = svc.store.events_desc(&job, None, 1).await {
                        events.iter().for_each(|e| svc.hub.publish(&job, e));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listening for events");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
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
