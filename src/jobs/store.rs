//! The queue's database through sqlx's `Any` driver: SQLite (the embedded default, a file in
//! the data directory) or PostgreSQL (`storage.database_url = "postgres://…"`, for several
//! hosts). The same statements where the two agree (`$N` parameters, `RETURNING`,
//! `ON CONFLICT`); [`Backend`] writes the few that differ: JSON paths, the database's clock,
//! `FOR UPDATE SKIP LOCKED` claims. Every state change is one statement naming the state it
//! expects.

use std::path::Path;

use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor, Row};
use utoipa::ToSchema;

use super::events::{Event, EventKind, Level};
use super::{now, JobsError, Result, Status};

/// `cancel_requested` of a running job: 1 asks its worker to cancel, 2 to pause.
const PAUSE_REQUESTED: i64 = 2;

/// Which jobs a list keeps by their metadata (`/v1`'s `metadata[k]=v`, `metadata=null`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataFilter {
    Any,
    /// Jobs without metadata.
    None,
    /// Jobs whose metadata has every one of these values.
    Has(Vec<(String, String)>),
}

/// What a running job's worker is asked to do, read when it renews its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    None,
    Cancel,
    Pause,
}

/// Which database a store runs on: the few statements that differ are written per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend of a `database_url`: `sqlite:` or `postgres:`/`postgresql:`.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" | "postgresql" => Some(Backend::Postgres),
            _ => None,
        }
    }

    /// The database's clock in unix seconds: leases are compared with it, so hosts whose
    /// clocks disagree still agree on which lease has run out.
    fn epoch(self) -> &'static str {
        match self {
            Backend::Sqlite => "unixepoch()",
            Backend::Postgres => "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp())) AS BIGINT)",
        }
    }

    /// A top-level string of a JSON text column (`NULL` if absent).
    fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Backend::Postgres => format!("({column}::jsonb ->> '{key}')"),
        }
    }

    /// What locks the queued row a claim takes, so concurrent claimers skip it.
    fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
    /// Where status changes are announced: each final (or paused) status writes one outbox
    /// row per endpoint that wants it, in the transaction of the change.
    webhooks: std::sync::Arc<Vec<WebhookTarget>>,
}

/// A webhook endpoint as the store sees it: where, and which event types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: String,
    /// `fine_tuning.job.succeeded`, `…failed`, `…cancelled`, `…paused`.
    pub events: Vec<String>,
}

/// The webhook event type of a status, if it has one.
pub fn webhook_type(status: Status) -> Option<&'static str> {
    Some(match status {
        Status::Succeeded => "fine_tuning.job.succeeded",
        Status::Failed => "fine_tuning.job.failed",
        Status::Cancelled => "fine_tuning.job.cancelled",
        Status::Paused => "fine_tuning.job.paused",
        Status::Queued | Status::Running => return None,
    })
}

/// A delivery not yet acknowledged by its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `webhook-id`, the same on every attempt.
    pub id: String,
    pub endpoint: String,
    pub kind: String,
    pub job_id: String,
    pub created_at: i64,
    pub attempts: i64,
}

/// An uploaded dataset.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct FileRow {
    pub id: String,
    pub filename: String,
    pub bytes: i64,
    /// alpaca, chat, sharegpt, completion or text.
    pub format: String,
    pub examples: i64,
    /// Counted when the upload named a model (`?model=`).
    pub tokens: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
}

/// How far a job has got.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: i64,
    pub total_steps: Option<i64>,
    pub last_loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// Tokens of the training set the job has trained on (each step counted once).
    pub trained_tokens: i64,
}

/// Names a job carries besides its spec (set through `/v1/fine_tuning/jobs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobLabels {
    /// Goes into the fine-tuned model's name.
    pub suffix: Option<String>,
    /// Up to 16 string pairs.
    pub metadata: Option<serde_json::Value>,
}

/// A fine-tune job with its progress.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct JobRow {
    pub id: String,
    pub status: Status,
    /// The job spec with every default filled in (its schema is the API's `JobSpec`).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub priority: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    pub attempts: i64,
    pub progress: Progress,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
    /// File ids of what a succeeded job's run produced for download: its step metrics CSV.
    pub result_files: Vec<String>,
}

/// An adapter checkpoint (`checkpoint-<step>` in the job's directory).
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct CheckpointRow {
    pub step: i64,
    pub name: String,
    pub created_at: i64,
    pub loss: Option<f64>,
}

/// A file the job produced (adapter, GGUF, merged safetensors), downloadable by name.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ArtifactRow {
    pub name: String,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
}

const JOB_COLUMNS: &str = "id, spec, status, priority, created_at, started_at, finished_at, error, attempts, step, total_steps, last_loss, tokens_per_second, eta_seconds, trained_tokens, suffix, metadata, result_files";

fn job_from_row(r: &sqlx::any::AnyRow) -> Result<JobRow> {
    let status: String = r.try_get("status")?;
    let spec: String = r.try_get("spec")?;
    Ok(JobRow {
        id: r.try_get("id")?,
        status: Status::parse(&status)
            .ok_or_else(|| JobsError::Corrupt(format!("job status {status:?}")))?,
        spec: serde_json::from_str(&spec)
            .map_err(|e| JobsError::Corrupt(format!("job spec: {e}")))?,
        priority: r.try_get("priority")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        error: r.try_get("error")?,
        attempts: r.try_get("attempts")?,
        progress: Progress {
            step: r.try_get("step")?,
            total_steps: r.try_get("total_steps")?,
            last_loss: r.try_get("last_loss")?,
            tokens_per_second: r.try_get("tokens_per_second")?,
            eta_seconds: r.try_get("eta_seconds")?,
            trained_tokens: r.try_get("trained_tokens")?,
        },
        suffix: r.try_get("suffix")?,
        metadata: r
            .try_get::<Option<String>, _>("metadata")?
            .and_then(|m| serde_json::from_str(&m).ok()),
        result_files: r
            .try_get::<Option<String>, _>("result_files")?
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or_default(),
    })
}

fn file_from_row(r: &sqlx::any::AnyRow) -> Result<FileRow> {
    Ok(FileRow {
        id: r.try_get("id")?,
        filename: r.try_get("filename")?,
        bytes: r.try_get("bytes")?,
        format: r.try_get("format")?,
        examples: r.try_get("examples")?,
        tokens: r.try_get("tokens")?,
        created_at: r.try_get("created_at")?,
    })
}

fn event_from_row(r: &sqlx::any::AnyRow) -> Result<Event> {
    let data: String = r.try_get("data")?;
    let kind: String = r.try_get("type")?;
    let level: String = r.try_get("level")?;
    Ok(Event {
        seq: r.try_get("seq")?,
        created_at: r.try_get("created_at")?,
        kind: EventKind::parse(&kind)
            .ok_or_else(|| JobsError::Corrupt(format!("event type {kind:?}")))?,
        level: Level::parse(&level)
            .ok_or_else(|| JobsError::Corrupt(format!("event level {level:?}")))?,
        message: r.try_get("message")?,
        data: serde_json::from_str(&data)
            .map_err(|e| JobsError::Corrupt(format!("event data: {e}")))?,
    })
}

impl Store {
    /// Open (creating) `data_dir/qlorad.db` in WAL mode and run the migrations.
    pub async fn open(data_dir: &Path) -> Result<Self> {
        Self::connect(None, data_dir).await
    }

    /// Connect to `database_url` (PostgreSQL), or without one open the SQLite file in
    /// `data_dir`, and bring its schema up to date.
    pub async fn connect(database_url: Option<&str>, data_dir: &Path) -> Result<Self> {
        static DRIVERS: std::sync::Once = std::sync::Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let url = match database_url {
            Some(u) => u.to_string(),
            None => {
                std::fs::create_dir_all(data_dir)?;
                format!("sqlite://{}?mode=rwc", data_dir.join("qlorad.db").display())
            }
        };
        let backend = Backend::of_url(&url).ok_or_else(|| {
            sqlx::Error::Configuration(
                format!("database_url must start with sqlite:// or postgres://, not {url:?}")
                    .into(),
            )
        })?;
        let opts: AnyConnectOptions = url.parse()?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA foreign_keys = ON",
                                "PRAGMA busy_timeout = 10000",
                            ] {
                                conn.execute(pragma).await?;
                            }
                            Ok(())
                        })
                    })
                    .after_release(|conn, _| {
                        Box::pin(async move { outside_transaction(conn).await })
                    })
                    .connect_with(opts)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .connect_with(opts)
                    .await?
            }
        };
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Store {
            pool,
            backend,
            webhooks: Default::default(),
        })
    }

    /// The same store, announcing status changes to these endpoints.
    pub fn with_webhooks(mut self, targets: Vec<WebhookTarget>) -> Self {
        self.webhooks = std::sync::Arc::new(targets);
        self
    }

    /// Outbox rows for a job's new status, inside the transaction that sets it.
    async fn queue_webhooks(
        &self,
        conn: &mut AnyConnection,
        job_id: &str,
        status: Status,
    ) -> Result<()> {
        let Some(kind) = webhook_type(status) else {
            return Ok(());
        };
        let t = now();
        for w in self
            .webhooks
            .iter()
            .filter(|w| w.events.iter().any(|e| e == kind))
        {
            sqlx::query(
                "INSERT INTO webhook_outbox (id, endpoint, type, job_id, created_at, next_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(format!("evt_{}", uuid::Uuid::new_v4().simple()))
            .bind(&w.url)
            .bind(kind)
            .bind(job_id)
            .bind(t)
            .bind(t)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Claim the deliveries due now for `lease_seconds`, oldest first, and for each job and
    /// endpoint only the oldest one not yet delivered: an endpoint hears of a job's events in
    /// order. A claimed row is not due again until its lease ends, so API processes sharing
    /// the outbox do not send it twice; one that dies mid-delivery leaves it to the others.
    pub async fn due_deliveries(&self, limit: i64, lease_seconds: i64) -> Result<Vec<Delivery>> {
        let t = now();
        let rows = sqlx::query(&format!(
            "UPDATE webhook_outbox SET next_at = $2 + $3 WHERE id IN (SELECT id FROM webhook_outbox o \
             WHERE delivered_at IS NULL AND next_at <= $2 AND NOT EXISTS (SELECT 1 FROM webhook_outbox p \
               WHERE p.job_id = o.job_id AND p.endpoint = o.endpoint AND p.delivered_at IS NULL AND p.rowid < o.rowid) \
             ORDER BY created_at, rowid LIMIT $1{}) \
             RETURNING rowid, id, endpoint, type, job_id, created_at, attempts",
            self.backend.skip_locked()
        ))
        .bind(limit)
        .bind(t)
        .bind(lease_seconds)
        .fetch_all(&self.pool)
        .await?;
        let mut rows: Vec<(i64, i64, &sqlx::any::AnyRow)> = rows
            .iter()
            .map(|r| Ok((r.try_get("created_at")?, r.try_get("rowid")?, r)))
            .collect::<Result<_>>()?;
        rows.sort_by_key(|(created, rowid, _)| (*created, *rowid));
        rows.into_iter()
            .map(|(_, _, r)| {
                Ok(Delivery {
                    id: r.try_get("id")?,
                    endpoint: r.try_get("endpoint")?,
                    kind: r.try_get("type")?,
                    job_id: r.try_get("job_id")?,
                    created_at: r.try_get("created_at")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect()
    }

    /// The endpoint acknowledged a delivery.
    pub async fn delivered(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE webhook_outbox SET delivered_at = $1, attempts = attempts + 1, last_error = NULL WHERE id = $2")
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// An attempt failed: try again at `next_at`.
    pub async fn delivery_failed(&self, id: &str, next_at: i64, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE webhook_outbox SET attempts = attempts + 1, next_at = $1, last_error = $2 WHERE id = $3",
        )
        .bind(next_at)
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A job's result file, owned by the job's owner, and listed in its `result_files`.
    pub async fn add_result_file(&self, job_id: &str, f: &FileRow) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO files (id, filename, bytes, format, examples, tokens, created_at, owner) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, owner FROM jobs WHERE id = $8",
        )
        .bind(&f.id)
        .bind(&f.filename)
        .bind(f.bytes)
        .bind(&f.format)
        .bind(f.examples)
        .bind(f.tokens)
        .bind(f.created_at)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        let append = match self.backend {
            Backend::Sqlite => "json_insert(COALESCE(result_files, '[]'), '$[#]', $1)",
            Backend::Postgres => {
                "(COALESCE(result_files, '[]')::jsonb || jsonb_build_array($1::text))::text"
            }
        };
        sqlx::query(&format!(
            "UPDATE jobs SET result_files = {append} WHERE id = $2"
        ))
        .bind(&f.id)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record an upload as `owner`'s.
    pub async fn insert_file(&self, f: &FileRow, owner: &str) -> Result<()> {
        sqlx::query("INSERT INTO files (id, filename, bytes, format, examples, tokens, created_at, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&f.id)
            .bind(&f.filename)
            .bind(f.bytes)
            .bind(&f.format)
            .bind(f.examples)
            .bind(f.tokens)
            .bind(f.created_at)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every file `scope` may see.
    pub async fn files(&self, scope: Scope<'_>) -> Result<Vec<FileRow>> {
        self.select_files(None, scope).await
    }

    /// Newest first; `after` is the id of the last file of the previous page.
    pub async fn files_page(
        &self,
        after: Option<&str>,
        limit: i64,
        scope: Scope<'_>,
    ) -> Result<Vec<FileRow>> {
        let rows = sqlx::query(
            "SELECT id, filename, bytes, format, examples, tokens, created_at FROM files \
             WHERE ($1 IS NULL OR rowid < (SELECT rowid FROM files WHERE id = $1)) AND ($3 IS NULL OR owner = $3) \
             ORDER BY rowid DESC LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .bind(scope.owner())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(file_from_row).collect()
    }

    /// The newest throughput a job on `model` reported (tokens a second), with that job's id:
    /// what a preflight's time estimate starts from.
    pub async fn measured_throughput(&self, model: &str) -> Result<Option<(String, f64)>> {
        let row = sqlx::query(&format!(
            "SELECT id, tokens_per_second FROM jobs WHERE {} = $1 \
             AND tokens_per_second > 0 ORDER BY COALESCE(finished_at, started_at, created_at) DESC, rowid DESC LIMIT 1",
            self.backend.json_text("spec", "model")
        ))
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("id")?, r.try_get("tokens_per_second")?)),
            None => None,
        })
    }

    /// A file `scope` may see; another owner's is not found.
    pub async fn file(&self, id: &str, scope: Scope<'_>) -> Result<FileRow> {
        self.select_files(Some(id), scope)
            .await?
            .pop()
            .ok_or_else(|| JobsError::NotFound(format!("file {id}")))
    }

    async fn select_files(&self, id: Option<&str>, scope: Scope<'_>) -> Result<Vec<FileRow>> {
        let rows = sqlx::query(
            "SELECT id, filename, bytes, format, examples, tokens, created_at FROM files \
             WHERE ($1 IS NULL OR id = $1) AND ($2 IS NULL OR owner = $2) ORDER BY created_at DESC, id",
        )
        .bind(id)
        .bind(scope.owner())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(file_from_row).collect()
    }

    /// Delete a file unless a queued or running job uses it (checked in the same statement).
    pub async fn delete_file(&self, id: &str, scope: Scope<'_>) -> Result<()> {
        let r = sqlx::query(&format!(
            "DELETE FROM files WHERE id = $1 AND ($2 IS NULL OR owner = $2) AND NOT EXISTS (SELECT 1 FROM jobs WHERE status IN ('queued', 'running') \
             AND ({} = $1 OR {} = $1))",
            self.backend.json_text("spec", "training_file"),
            self.backend.json_text("spec", "validation_file"),
        ))
        .bind(id)
        .bind(scope.owner())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            self.file(id, scope).await?;
            return Err(JobsError::Conflict(format!(
                "file {id} is used by a queued or running job"
            )));
        }
        Ok(())
    }

    /// Insert a queued job of `owner` and its first event in one transaction, unless `owner`
    /// already has `max_queued` jobs waiting (checked in the insert itself).
    pub async fn insert_job(
        &self,
        id: &str,
        spec: &serde_json::Value,
        priority: i64,
        labels: &JobLabels,
        owner: &str,
        max_queued: i64,
    ) -> Result<JobRow> {
        let mut tx = self.pool.begin().await?;
        let t = now();
        let r = sqlx::query(
            "INSERT INTO jobs (id, spec, status, priority, created_at, suffix, metadata, owner) \
             SELECT $1, $2, 'queued', $3, $4, $5, $6, $7 \
             WHERE (SELECT COUNT(*) FROM jobs WHERE owner = $7 AND status = 'queued') < $8",
        )
        .bind(id)
        .bind(spec.to_string())
        .bind(priority)
        .bind(t)
        .bind(&labels.suffix)
        .bind(labels.metadata.as_ref().map(|m| m.to_string()))
        .bind(owner)
        .bind(max_queued)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(JobsError::Limit(format!(
                "{max_queued} jobs are already queued for this key; wait for some to start or cancel them"
            )));
        }
        sqlx::query("INSERT INTO job_events (job_id, seq, created_at, type, level, message, data) VALUES ($1, 1, $2, 'status', 'info', 'queued', $3)")
            .bind(id)
            .bind(t)
            .bind(serde_json::json!({"status": "queued"}).to_string())
            .execute(&mut *tx)
            .await?;
        // Read inside the transaction: once committed a worker may claim it at once.
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let job = job_from_row(&row)?;
        tx.commit().await?;
        Ok(job)
    }

    /// A job `scope` may see; another owner's is not found.
    pub async fn job(&self, id: &str, scope: Scope<'_>) -> Result<JobRow> {
        let r = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2 IS NULL OR owner = $2)"
        ))
        .bind(id)
        .bind(scope.owner())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| JobsError::NotFound(format!("job {id}")))?;
        job_from_row(&r)
    }

    /// Newest first; `after` is the id of the last job of the previous page.
    pub async fn jobs(
        &self,
        status: Option<Status>,
        after: Option<&str>,
        limit: i64,
        scope: Scope<'_>,
    ) -> Result<Vec<JobRow>> {
        self.jobs_where(status, &MetadataFilter::Any, after, limit, scope)
            .await
    }

    /// Jobs as [`Store::jobs`], of these metadata only.
    pub async fn jobs_where(
        &self,
        status: Option<Status>,
        metadata: &MetadataFilter,
        after: Option<&str>,
        limit: i64,
        scope: Scope<'_>,
    ) -> Result<Vec<JobRow>> {
        let mut sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR rowid < (SELECT rowid FROM jobs WHERE id = $2)) \
             AND ($4 IS NULL OR owner = $4)"
        );
        let pairs: &[(String, String)] = match metadata {
            MetadataFilter::Any => &[],
            MetadataFilter::None => {
                sql.push_str(" AND metadata IS NULL");
                &[]
            }
            MetadataFilter::Has(pairs) => pairs,
        };
        for i in 0..pairs.len() {
            let (k, v) = (5 + 2 * i, 6 + 2 * i);
            sql.push_str(&match self.backend {
                // By key, whatever it holds: a JSON path cannot name every key.
                Backend::Sqlite => format!(
                    " AND EXISTS (SELECT 1 FROM json_each(metadata) WHERE key = ${k} AND value = ${v})"
                ),
                Backend::Postgres => {
                    format!(" AND (metadata::jsonb ->> ${k}) IS NOT DISTINCT FROM ${v}")
                }
            });
        }
        sql.push_str(" ORDER BY rowid DESC LIMIT $3");
        let mut q = sqlx::query(&sql)
            .bind(status.map(|s| s.as_str()))
            .bind(after)
            .bind(limit)
            .bind(scope.owner());
        for (k, v) in pairs {
            q = q.bind(k.clone()).bind(v.clone());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Claim the highest-priority, oldest queued job for `worker` and record its `running`
    /// event, in one transaction.
    pub async fn claim(
        &self,
        worker: &str,
        lease_seconds: i64,
    ) -> Result<Option<(String, String, Event)>> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = 'running', worker = $1, lease_until = {epoch} + $2, started_at = COALESCE(started_at, $3), \
             attempts = attempts + 1 \
             WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, created_at, rowid LIMIT 1{skip}) \
             AND status = 'queued' RETURNING id, spec",
            epoch = self.backend.epoch(),
            skip = self.backend.skip_locked(),
        ))
        .bind(worker)
        .bind(lease_seconds)
        .bind(now())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = r else {
            return Ok(None);
        };
        let (id, spec): (String, String) = (r.try_get("id")?, r.try_get("spec")?);
        let data = serde_json::json!({"status": "running", "worker": worker});
        let e = insert_event(
            &mut tx,
            &id,
            EventKind::Status,
            Level::Info,
            "running",
            data,
        )
        .await?;
        tx.commit().await?;
        Ok(Some((id, spec, e)))
    }

    /// Renew a lease; returns what was asked of the run (nothing if the job is not ours).
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease_seconds: i64,
    ) -> Result<StopRequest> {
        let r = sqlx::query(&format!(
            "UPDATE jobs SET lease_until = {} + $1 WHERE id = $2 AND worker = $3 AND status = 'running' RETURNING cancel_requested",
            self.backend.epoch()
        ))
            .bind(lease_seconds)
            .bind(id)
            .bind(worker)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => match r.try_get::<i64, _>("cancel_requested")? {
                0 => StopRequest::None,
                PAUSE_REQUESTED => StopRequest::Pause,
                _ => StopRequest::Cancel,
            },
            None => StopRequest::None,
        })
    }

    /// Move a job of `scope` that is in one of `from` to `to`, with its status event (and the
    /// webhooks that want it) in the same transaction; None if it was in none of them.
    async fn transition(
        &self,
        id: &str,
        scope: Scope<'_>,
        from: &[Status],
        to: Status,
        message: &str,
    ) -> Result<Option<Event>> {
        let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(&format!(
            "UPDATE jobs SET status = $1, finished_at = COALESCE($2, finished_at) WHERE id = $3 \
             AND status IN ({}) AND ($4 IS NULL OR owner = $4)",
            from.join(", ")
        ))
        .bind(to.as_str())
        .bind(to.is_final().then(now))
        .bind(id)
        .bind(scope.owner())
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        let data = serde_json::json!({"status": to.as_str()});
        let e = insert_event(&mut tx, id, EventKind::Status, Level::Info, message, data).await?;
        self.queue_webhooks(&mut tx, id, to).await?;
        tx.commit().await?;
        Ok(Some(e))
    }

    /// Pause: a queued job at once, with its `paused` event (returned for broadcast); a
    /// running one is flagged for its worker, which checkpoints, stops and records `paused`.
    /// Pausing a paused job changes nothing; a finished one is a conflict.
    pub async fn request_pause(&self, id: &str, scope: Scope<'_>) -> Result<Option<Event>> {
        let paused = self
            .transition(id, scope, &[Status::Queued], Status::Paused, "paused")
            .await?;
        if paused.is_some() {
            return Ok(paused);
        }
        // A cancel already asked for wins over a pause.
        sqlx::query(
            "UPDATE jobs SET cancel_requested = $1 WHERE id = $2 AND status = 'running' \
             AND cancel_requested = 0 AND ($3 IS NULL OR owner = $3)",
        )
        .bind(PAUSE_REQUESTED)
        .bind(id)
        .bind(scope.owner())
        .execute(&self.pool)
        .await?;
        let job = self.job(id, scope).await?;
        if job.status.is_final() {
            return Err(JobsError::Conflict(format!(
                "job {id} has already {}; only a queued or running job pauses",
                job.status.as_str()
            )));
        }
        Ok(None)
    }

    /// Resume a paused job: it is queued again and continues from its checkpoint. Resuming a
    /// job that is not paused is a conflict.
    pub async fn resume(&self, id: &str, scope: Scope<'_>) -> Result<Event> {
        let message = "resumed: queued; continues from its checkpoint";
        let resumed = self
            .transition(id, scope, &[Status::Paused], Status::Queued, message)
            .await?;
        if let Some(e) = resumed {
            return Ok(e);
        }
        let job = self.job(id, scope).await?;
        Err(JobsError::Conflict(format!(
            "job {id} is {}; only a paused job resumes",
            job.status.as_str()
        )))
    }

    /// Record a step; `step_tokens` adds to `trained_tokens`.
    pub async fn update_progress(&self, id: &str, p: &Progress, step_tokens: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET step = $1, total_steps = $2, last_loss = $3, tokens_per_second = $4, eta_seconds = $5, \
                     trained_tokens = trained_tokens + $6 WHERE id = $7 AND status = 'running'")
            .bind(p.step)
            .bind(p.total_steps)
            .bind(p.last_loss)
            .bind(p.tokens_per_second)
            .bind(p.eta_seconds)
            .bind(step_tokens)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A run (re)starting at `start_step`: `trained_tokens` becomes the tokens of the steps up to
    /// it, each counted once, so steps replayed after a resume are not counted twice.
    pub async fn reset_trained_tokens(&self, id: &str, start_step: i64) -> Result<()> {
        let (tokens, step) = match self.backend {
            Backend::Sqlite => (
                "json_extract(data, '$.tokens')".to_string(),
                "json_extract(data, '$.step')".to_string(),
            ),
            Backend::Postgres => (
                "CAST(data::jsonb ->> 'tokens' AS BIGINT)".to_string(),
                "CAST(data::jsonb ->> 'step' AS BIGINT)".to_string(),
            ),
        };
        sqlx::query(&format!(
            "UPDATE jobs SET trained_tokens = (SELECT CAST(COALESCE(SUM(t), 0) AS BIGINT) FROM \
             (SELECT MAX({tokens}) AS t FROM job_events WHERE job_id = $1 AND type = 'metrics' \
              AND {tokens} IS NOT NULL AND {step} <= $2 \
              GROUP BY {step}) AS per_step) WHERE id = $1"
        ))
        .bind(id)
        .bind(start_step)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many jobs are in each status (every status present, zero if none).
    pub async fn count_by_status(&self) -> Result<Vec<(Status, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut counts: Vec<(Status, i64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
        for r in rows {
            let status: String = r.try_get("status")?;
            if let Some(c) = counts.iter_mut().find(|(s, _)| s.as_str() == status) {
                c.1 = r.try_get("n")?;
            }
        }
        Ok(counts)
    }

    /// Move a running job of `worker` to `to` (final, or back to queued) and record its status
    /// event, in one transaction; `None` if the job was not ours.
    pub async fn finish(
        &self,
        id: &str,
        worker: &str,
        to: Status,
        error: Option<&str>,
        message: &str,
    ) -> Result<Option<Event>> {
        let finished = if to.is_final() { Some(now()) } else { None };
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = $1, finished_at = $2, error = $3, worker = NULL, lease_until = NULL, cancel_requested = 0 \
             WHERE id = $4 AND status = 'running' AND worker = $5",
        )
        .bind(to.as_str())
        .bind(finished)
        .bind(error)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        let mut data = serde_json::json!({"status": to.as_str()});
        if let Some(e) = error {
            data["error"] = e.into();
        }
        let level = if error.is_some() {
            Level::Error
        } else {
            Level::Info
        };
        let e = insert_event(&mut tx, id, EventKind::Status, level, message, data).await?;
        self.queue_webhooks(&mut tx, id, to).await?;
        tx.commit().await?;
        Ok(Some(e))
    }

    /// Cancel: a queued job at once, with its `cancelled` event in the same transaction (returned
    /// for broadcast); a running one is flagged for its worker, which records it when the run stops.
    pub async fn request_cancel(&self, id: &str, scope: Scope<'_>) -> Result<Option<Event>> {
        let from = [Status::Queued, Status::Paused];
        let cancelled = self
            .transition(id, scope, &from, Status::Cancelled, "cancelled")
            .await?;
        if cancelled.is_some() {
            return Ok(cancelled);
        }
        sqlx::query(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND status = 'running' AND ($2 IS NULL OR owner = $2)",
        )
        .bind(id)
        .bind(scope.owner())
        .execute(&self.pool)
        .await?;
        self.job(id, scope).await?; // 404 for an unknown job or another owner's
        Ok(None)
    }

    /// Jobs left running by a dead process (or an expired lease) go back to the queue, each with
    /// its `queued` event, in one transaction.
    pub async fn requeue_stale(&self, all_running: bool) -> Result<Vec<(String, Event)>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL WHERE status = 'running' AND ($1 OR lease_until < {}) RETURNING id",
            self.backend.epoch()
        ))
        .bind(all_running)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get("id")?;
            let data = serde_json::json!({"status": "queued"});
            let message = "queued again: its worker stopped; resumes from its last checkpoint";
            let e = insert_event(
                &mut tx,
                &id,
                EventKind::Status,
                Level::Warning,
                message,
                data,
            )
            .await?;
            out.push((id, e));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Delete a finished job of `scope`.
    pub async fn delete_job(&self, id: &str, scope: Scope<'_>) -> Result<()> {
        let r = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND status IN ('succeeded', 'failed', 'cancelled') AND ($2 IS NULL OR owner = $2)",
        )
        .bind(id)
        .bind(scope.owner())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            self.job(id, scope).await?;
            return Err(JobsError::Conflict(format!(
                "job {id} has not finished; cancel it first"
            )));
        }
        Ok(())
    }

    /// Forget a job's artifacts (a run about to produce them again).
    pub async fn clear_artifacts(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM artifacts WHERE job_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Append an event with the next sequence number (gapless per job).
    pub async fn append_event(
        &self,
        id: &str,
        kind: EventKind,
        level: Level,
        message: &str,
        data: serde_json::Value,
    ) -> Result<Event> {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = self.pool.acquire().await?;
                insert_event(&mut conn, id, kind, level, message, data).await
            }
            // Lock the job's row first: its next `seq`, read by the insert's own statement
            // (a fresh snapshot), then sees every other writer's events.
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let e = insert_event(&mut tx, id, kind, level, message, data).await?;
                tx.commit().await?;
                Ok(e)
            }
        }
    }

    pub async fn events(&self, id: &str, after: i64, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query("SELECT seq, created_at, type, level, message, data FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3")
            .bind(id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Newest first, those before `before` (a `seq`) when given.
    pub async fn events_desc(
        &self,
        id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query("SELECT seq, created_at, type, level, message, data FROM job_events \
                                WHERE job_id = $1 AND ($2 IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3")
            .bind(id)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    pub async fn add_checkpoint(
        &self,
        id: &str,
        step: i64,
        name: &str,
        loss: Option<f64>,
    ) -> Result<()> {
        sqlx::query("INSERT INTO checkpoints (job_id, step, name, created_at, loss) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (job_id, step) DO UPDATE SET name = excluded.name, created_at = excluded.created_at, loss = excluded.loss")
            .bind(id)
            .bind(step)
            .bind(name)
            .bind(now())
            .bind(loss)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn checkpoints(&self, id: &str) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query(
            "SELECT step, name, created_at, loss FROM checkpoints WHERE job_id = $1 ORDER BY step",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CheckpointRow {
                    step: r.try_get("step")?,
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    loss: r.try_get("loss")?,
                })
            })
            .collect()
    }

    pub async fn add_artifact(&self, id: &str, a: &ArtifactRow) -> Result<()> {
        sqlx::query("INSERT INTO artifacts (job_id, name, bytes, sha256, created_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (job_id, name) DO UPDATE SET bytes = excluded.bytes, sha256 = excluded.sha256, created_at = excluded.created_at")
            .bind(id)
            .bind(&a.name)
            .bind(a.bytes)
            .bind(&a.sha256)
            .bind(a.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn artifacts(&self, id: &str) -> Result<Vec<ArtifactRow>> {
        let rows = sqlx::query(
            "SELECT name, bytes, sha256, created_at FROM artifacts WHERE job_id = $1 ORDER BY name",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ArtifactRow {
                    name: r.try_get("name")?,
                    bytes: r.try_get("bytes")?,
                    sha256: r.try_get("sha256")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }
}

/// Whether a released SQLite connection may go back to the pool. A statement that failed on a
/// full disk can leave its connection inside a transaction SQLite did not end: reused, it would
/// hold the write lock and a stale snapshot. A `ROLLBACK` that succeeds found such a
/// transaction; the connection is closed instead.
async fn outside_transaction(conn: &mut AnyConnection) -> std::result::Result<bool, sqlx::Error> {
    if conn.backend_name() != "SQLite" {
        return Ok(true);
    }
    match conn.execute("ROLLBACK").await {
        Ok(_) => {
            tracing::warn!("closing a database connection left inside a transaction");
            Ok(false)
        }
        Err(_) => Ok(true),
    }
}

/// Insert an event with the next sequence number of its job: one statement, so numbers have no
/// gaps and (the primary key) no duplicates.
async fn insert_event(
    conn: &mut AnyConnection,
    id: &str,
    kind: EventKind,
    level: Level,
    message: &str,
    data: serde_json::Value,
) -> Result<Event> {
    let t = now();
    let r = sqlx::query(
        "INSERT INTO job_events (job_id, seq, created_at, type, level, message, data) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1), $2, $3, $4, $5, $6) RETURNING seq",
    )
    .bind(id)
    .bind(t)
    .bind(kind.as_str())
    .bind(level.as_str())
    .bind(message)
    .bind(data.to_string())
    .fetch_one(&mut *conn)
    .await?;
    Ok(Event {
        seq: r.try_get("seq")?,
        created_at: t,
        kind,
        level,
        message: message.into(),
        data,
    })
}

/// Whose rows a query may touch: every owner's (an admin key, or a server without keys), or
/// one key's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    All,
    Owner(&'a str),
}

impl Scope<'_> {
    /// The owner to filter on, as a query binds it (NULL for every owner).
    fn owner(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Owner(o) => Some(o),
        }
    }
}

/// Test databases: a fresh PostgreSQL database per test on the server of `TEST_DATABASE_URL`
/// (`scripts/test_services.sh` starts one on loopback).
#[doc(hidden)]
pub mod testing {
    use sqlx::Connection;

    /// A new empty database's URL, or None where `TEST_DATABASE_URL` is unset (a test then
    /// says it skipped). Under CI (`CI` set) an unset URL fails instead: CI starts the server.
    pub async fn postgres() -> Option<String> {
        let Ok(server) = std::env::var("TEST_DATABASE_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "TEST_DATABASE_URL is unset: source scripts/test_services.sh"
            );
            eprintln!("skipped: TEST_DATABASE_URL is unset (scripts/test_services.sh sets it)");
            return None;
        };
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("TEST_DATABASE_URL {server}: {e}"));
        let name = format!("qlorad_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let (base, _) = server
            .rsplit_once('/')
            .expect("a database URL ends in /NAME");
        Some(format!("{base}/{name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case runs on SQLite and on PostgreSQL: `name` on both, as `name::sqlite` and
    /// `name::postgres`.
    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    let tmp = tempfile::tempdir().unwrap();
                    let s = super::Store::open(tmp.path()).await.unwrap();
                    super::$name(s).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let Some(url) = super::testing::postgres().await else {
                        return;
                    };
                    let tmp = tempfile::tempdir().unwrap();
                    let s = super::Store::connect(Some(&url), tmp.path()).await.unwrap();
                    assert_eq!(s.backend, super::Backend::Postgres);
                    super::$name(s).await;
                }
            }
        )*};
    }

    fn file(id: &str) -> FileRow {
        FileRow {
            id: id.into(),
            filename: "train.jsonl".into(),
            bytes: 10,
            format: "chat".into(),
            examples: 2,
            tokens: None,
            created_at: now(),
        }
    }

    async fn queue(s: &Store, id: &str, priority: i64) -> JobRow {
        let spec = serde_json::json!({"training_file": "file-1", "priority": priority});
        s.insert_job(id, &spec, priority, &JobLabels::default(), "alice", 10)
            .await
            .unwrap()
    }

    on_both!(
        a_job_goes_queued_running_succeeded_with_one_event_per_change,
        claims_take_priority_then_age_and_failures_record_their_error,
        cancel_stops_a_queued_job_at_once_and_flags_a_running_one,
        stale_leases_requeue_and_only_ended_jobs_delete,
        queue_limits_file_ownership_and_files_in_use,
        checkpoints_artifacts_and_events_keep_their_order,
        a_corrupt_row_is_an_internal_error_not_a_conflict,
        eight_concurrent_claimers_take_each_job_once,
        concurrent_writers_keep_event_numbers_gapless,
        metadata_result_files_tokens_and_throughput_read_the_json,
        a_claimed_delivery_waits_out_its_lease_and_keeps_the_order,
    );

    fn statuses(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter(|e| e.kind == EventKind::Status)
            .map(|e| e.data["status"].as_str().unwrap().to_string())
            .collect()
    }

    async fn a_job_goes_queued_running_succeeded_with_one_event_per_change(s: Store) {
        let job = queue(&s, "job-a", 0).await;
        assert_eq!((job.status, job.attempts), (Status::Queued, 0));

        let (id, spec, running) = s.claim("w1", 30).await.unwrap().unwrap();
        assert_eq!((id.as_str(), running.seq), ("job-a", 2));
        assert!(spec.contains("file-1"));
        assert!(s.claim("w2", 30).await.unwrap().is_none(), "claimed once");
        let job = s.job("job-a", Scope::All).await.unwrap();
        assert_eq!((job.status, job.attempts), (Status::Running, 1));
        assert!(job.started_at.is_some());

        assert_eq!(
            s.heartbeat("job-a", "w1", 30).await.unwrap(),
            StopRequest::None
        );
        assert_eq!(
            s.heartbeat("job-a", "w2", 30).await.unwrap(),
            StopRequest::None,
            "not w2's"
        );
        let p = Progress {
            step: 3,
            total_steps: Some(5),
            last_loss: Some(1.5),
            tokens_per_second: Some(10.0),
            eta_seconds: Some(2.0),
            trained_tokens: 0,
        };
        s.update_progress("job-a", &p, 40).await.unwrap();
        s.update_progress("job-a", &p, 40).await.unwrap();
        let job = s.job("job-a", Scope::All).await.unwrap();
        assert_eq!((job.progress.step, job.progress.trained_tokens), (3, 80));

        assert!(s
            .finish("job-a", "w2", Status::Succeeded, None, "succeeded")
            .await
            .unwrap()
            .is_none());
        let end = s
            .finish("job-a", "w1", Status::Succeeded, None, "succeeded")
            .await
            .unwrap()
            .unwrap();
        assert!(end.is_final());
        let job = s.job("job-a", Scope::All).await.unwrap();
        assert_eq!(job.status, Status::Succeeded);
        assert!(job.finished_at.is_some());
        // Ended: no further update or heartbeat touches it.
        s.update_progress("job-a", &Progress { step: 9, ..p }, 1)
            .await
            .unwrap();
        assert_eq!(s.job("job-a", Scope::All).await.unwrap().progress.step, 3);
        let events = s.events("job-a", 0, 100).await.unwrap();
        assert_eq!(statuses(&events), ["queued", "running", "succeeded"]);
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    async fn claims_take_priority_then_age_and_failures_record_their_error(s: Store) {
        queue(&s, "job-old", 0).await;
        queue(&s, "job-urgent", 5).await;
        let (first, _, _) = s.claim("w", 30).await.unwrap().unwrap();
        assert_eq!(first, "job-urgent");
        let e = s
            .finish(
                "job-urgent",
                "w",
                Status::Failed,
                Some("bad data"),
                "failed: bad data",
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.level, e.data["error"].as_str()),
            (Level::Error, Some("bad data"))
        );
        let job = s.job("job-urgent", Scope::All).await.unwrap();
        assert_eq!(
            (job.status, job.error.as_deref()),
            (Status::Failed, Some("bad data"))
        );

        // A retry goes back to the queue; the next claim counts a second attempt.
        let (id, _, _) = s.claim("w", 30).await.unwrap().unwrap();
        assert_eq!(id, "job-old");
        s.finish("job-old", "w", Status::Queued, None, "queued again")
            .await
            .unwrap()
            .unwrap();
        let (id, _, _) = s.claim("w", 30).await.unwrap().unwrap();
        assert_eq!(id, "job-old");
        assert_eq!(s.job("job-old", Scope::All).await.unwrap().attempts, 2);
    }

    async fn cancel_stops_a_queued_job_at_once_and_flags_a_running_one(s: Store) {
        queue(&s, "job-q", 0).await;
        let e = s
            .request_cancel("job-q", Scope::All)
            .await
            .unwrap()
            .unwrap();
        assert!(e.is_final());
        assert_eq!(
            s.job("job-q", Scope::All).await.unwrap().status,
            Status::Cancelled
        );

        queue(&s, "job-r", 0).await;
        s.claim("w", 30).await.unwrap().unwrap();
        assert!(s
            .request_cancel("job-r", Scope::All)
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            s.heartbeat("job-r", "w", 30).await.unwrap(),
            StopRequest::Cancel,
            "the worker sees the flag"
        );
        assert!(matches!(
            s.request_cancel("job-r", Scope::Owner("bob")).await,
            Err(JobsError::NotFound(_))
        ));
        assert!(matches!(
            s.request_cancel("job-missing", Scope::All).await,
            Err(JobsError::NotFound(_))
        ));
    }

    async fn stale_leases_requeue_and_only_ended_jobs_delete(s: Store) {
        queue(&s, "job-a", 0).await;
        s.claim("w", -1).await.unwrap().unwrap(); // a lease already expired
        assert!(matches!(
            s.delete_job("job-a", Scope::All).await,
            Err(JobsError::Conflict(_))
        ));
        let requeued = s.requeue_stale(false).await.unwrap();
        assert_eq!(requeued.len(), 1);
        assert_eq!(requeued[0].1.level, Level::Warning);
        assert_eq!(
            s.job("job-a", Scope::All).await.unwrap().status,
            Status::Queued
        );
        assert!(s.requeue_stale(false).await.unwrap().is_empty());
        s.claim("w", 30).await.unwrap().unwrap();
        assert!(
            s.requeue_stale(false).await.unwrap().is_empty(),
            "lease live"
        );
        assert_eq!(s.requeue_stale(true).await.unwrap().len(), 1, "a restart");

        s.request_cancel("job-a", Scope::All).await.unwrap();
        s.delete_job("job-a", Scope::All).await.unwrap();
        assert!(matches!(
            s.job("job-a", Scope::All).await,
            Err(JobsError::NotFound(_))
        ));
        assert!(
            s.events("job-a", 0, 10).await.unwrap().is_empty(),
            "cascade"
        );
    }

    async fn queue_limits_file_ownership_and_files_in_use(s: Store) {
        s.insert_file(&file("file-1"), "alice").await.unwrap();
        assert!(s.file("file-1", Scope::Owner("alice")).await.is_ok());
        assert!(matches!(
            s.file("file-1", Scope::Owner("bob")).await,
            Err(JobsError::NotFound(_))
        ));
        let spec = serde_json::json!({"training_file": "file-1"});
        for i in 0..2 {
            s.insert_job(
                &format!("job-{i}"),
                &spec,
                0,
                &JobLabels::default(),
                "alice",
                2,
            )
            .await
            .unwrap();
        }
        assert!(matches!(
            s.insert_job("job-2", &spec, 0, &JobLabels::default(), "alice", 2)
                .await,
            Err(JobsError::Limit(_))
        ));
        s.insert_job("job-3", &spec, 0, &JobLabels::default(), "bob", 2)
            .await
            .unwrap();
        assert!(matches!(
            s.delete_file("file-1", Scope::All).await,
            Err(JobsError::Conflict(_))
        ));
        for id in ["job-0", "job-1", "job-3"] {
            s.request_cancel(id, Scope::All).await.unwrap();
        }
        s.delete_file("file-1", Scope::All).await.unwrap();
        assert!(s.files(Scope::All).await.unwrap().is_empty());
    }

    async fn checkpoints_artifacts_and_events_keep_their_order(s: Store) {
        queue(&s, "job-a", 0).await;
        for seq in 2..=4 {
            let e = s
                .append_event(
                    "job-a",
                    EventKind::Log,
                    Level::Info,
                    "log",
                    serde_json::json!({}),
                )
                .await
                .unwrap();
            assert_eq!(e.seq, seq);
        }
        let desc: Vec<i64> = s
            .events_desc("job-a", Some(4), 2)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(desc, [3, 2]);
        s.add_checkpoint("job-a", 4, "checkpoint-4", Some(1.0))
            .await
            .unwrap();
        s.add_checkpoint("job-a", 2, "checkpoint-2", None)
            .await
            .unwrap();
        let steps: Vec<i64> = s
            .checkpoints("job-a")
            .await
            .unwrap()
            .iter()
            .map(|c| c.step)
            .collect();
        assert_eq!(steps, [2, 4]);
        let art = ArtifactRow {
            name: "adapter/adapter_model.safetensors".into(),
            bytes: 3,
            sha256: "ab".into(),
            created_at: now(),
        };
        s.add_artifact("job-a", &art).await.unwrap();
        assert_eq!(s.artifacts("job-a").await.unwrap(), [art]);
        s.clear_artifacts("job-a").await.unwrap();
        assert!(s.artifacts("job-a").await.unwrap().is_empty());
    }

    async fn a_corrupt_row_is_an_internal_error_not_a_conflict(s: Store) {
        queue(&s, "job-a", 0).await;
        sqlx::query("UPDATE jobs SET status = 'paused?' WHERE id = 'job-a'")
            .execute(&s.pool)
            .await
            .unwrap();
        assert!(matches!(
            s.job("job-a", Scope::All).await,
            Err(JobsError::Corrupt(_))
        ));
        sqlx::query("UPDATE job_events SET type = 'weird' WHERE job_id = 'job-a'")
            .execute(&s.pool)
            .await
            .unwrap();
        assert!(matches!(
            s.events("job-a", 0, 10).await,
            Err(JobsError::Corrupt(_))
        ));
    }

    async fn eight_concurrent_claimers_take_each_job_once(s: Store) {
        for i in 0..40 {
            let spec = serde_json::json!({"training_file": "file-1"});
            let id = format!("job-{i:02}");
            s.insert_job(&id, &spec, i % 3, &JobLabels::default(), "alice", 100)
                .await
                .unwrap();
        }
        let claimers = (0..8).map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut mine = vec![];
                loop {
                    match s.claim(&format!("w{w}"), 30).await {
                        Ok(Some((id, _, e))) => {
                            assert_eq!(e.seq, 2, "{id}: one running event");
                            mine.push(id);
                        }
                        Ok(None) => return mine,
                        // SQLite's writers wait on one lock; a busy answer is a retry.
                        Err(e) => assert!(e.to_string().contains("locked"), "{e}"),
                    }
                }
            })
        });
        let mut all: Vec<String> = vec![];
        for c in claimers.collect::<Vec<_>>() {
            all.extend(c.await.unwrap());
        }
        all.sort();
        let want: Vec<String> = (0..40).map(|i| format!("job-{i:02}")).collect();
        assert_eq!(all, want, "every job claimed, none twice");
        let counts = s.count_by_status().await.unwrap();
        assert!(counts.contains(&(Status::Running, 40)), "{counts:?}");
    }

    async fn concurrent_writers_keep_event_numbers_gapless(s: Store) {
        queue(&s, "job-a", 0).await;
        s.claim("w1", 30).await.unwrap().unwrap();
        let writers = (0..8).map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let data = serde_json::json!({"writer": w, "i": i});
                    s.append_event("job-a", EventKind::Log, Level::Info, "x", data)
                        .await
                        .unwrap();
                }
            })
        });
        for w in writers.collect::<Vec<_>>() {
            w.await.unwrap();
        }
        let seqs: Vec<i64> = s
            .events("job-a", 0, 1000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=82).collect::<Vec<i64>>());
    }

    async fn metadata_result_files_tokens_and_throughput_read_the_json(s: Store) {
        let spec = serde_json::json!({"model": "tiny", "training_file": "file-1"});
        let labels = |m: serde_json::Value| JobLabels {
            suffix: None,
            metadata: Some(m),
        };
        let meta = labels(serde_json::json!({"team": "a", "odd \"key\"": "x"}));
        s.insert_job("job-a", &spec, 0, &meta, "alice", 10)
            .await
            .unwrap();
        let other = labels(serde_json::json!({"team": "b"}));
        s.insert_job("job-b", &spec, 0, &other, "alice", 10)
            .await
            .unwrap();
        s.insert_job("job-c", &spec, 0, &JobLabels::default(), "alice", 10)
            .await
            .unwrap();
        let ids = |jobs: Vec<JobRow>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        let has = |pairs: &[(&str, &str)]| {
            MetadataFilter::Has(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let page = |f: MetadataFilter| {
            let s = s.clone();
            async move { s.jobs_where(None, &f, None, 10, Scope::All).await.unwrap() }
        };
        assert_eq!(ids(page(has(&[("team", "a")])).await), ["job-a"]);
        assert_eq!(ids(page(has(&[("odd \"key\"", "x")])).await), ["job-a"]);
        assert!(page(has(&[("team", "c")])).await.is_empty());
        assert_eq!(ids(page(MetadataFilter::None).await), ["job-c"]);
        let after_c = s.jobs(None, Some("job-c"), 10, Scope::All).await.unwrap();
        assert_eq!(
            ids(after_c),
            ["job-b", "job-a"],
            "newest first, after job-c"
        );

        // A queued job's files are in use; its result files are a JSON list.
        s.insert_file(&file("file-1"), "alice").await.unwrap();
        let busy = s.delete_file("file-1", Scope::All).await.unwrap_err();
        assert!(matches!(busy, JobsError::Conflict(_)), "{busy}");
        for id in ["file-r1", "file-r2"] {
            s.add_result_file("job-a", &file(id)).await.unwrap();
        }
        let job = s.job("job-a", Scope::All).await.unwrap();
        assert_eq!(job.result_files, ["file-r1", "file-r2"]);

        // Tokens: the largest count per step, each step once, up to the resumed step.
        s.claim("w1", 30).await.unwrap().unwrap();
        for (step, tokens) in [(1, 10), (2, 20), (2, 25), (3, 30)] {
            let data = serde_json::json!({"step": step, "tokens": tokens});
            s.append_event("job-a", EventKind::Metrics, Level::Info, "m", data)
                .await
                .unwrap();
        }
        s.reset_trained_tokens("job-a", 2).await.unwrap();
        let job = s.job("job-a", Scope::All).await.unwrap();
        assert_eq!(job.progress.trained_tokens, 35);

        let p = Progress {
            step: 3,
            total_steps: Some(9),
            last_loss: Some(1.5),
            tokens_per_second: Some(1234.5),
            eta_seconds: Some(2.0),
            trained_tokens: 0,
        };
        s.update_progress("job-a", &p, 30).await.unwrap();
        let (id, tps) = s.measured_throughput("tiny").await.unwrap().unwrap();
        assert_eq!((id.as_str(), tps), ("job-a", 1234.5));
        assert!(s.measured_throughput("other").await.unwrap().is_none());
    }

    async fn a_claimed_delivery_waits_out_its_lease_and_keeps_the_order(s: Store) {
        let s = s.with_webhooks(vec![WebhookTarget {
            url: "http://hooks.test/a".into(),
            events: vec![
                "fine_tuning.job.cancelled".into(),
                "fine_tuning.job.paused".into(),
            ],
        }]);
        queue(&s, "job-a", 0).await;
        s.request_pause("job-a", Scope::All).await.unwrap().unwrap();
        s.request_cancel("job-a", Scope::All)
            .await
            .unwrap()
            .unwrap();
        // Two processes ask at once: the paused delivery goes to one; the cancelled one waits
        // behind it.
        let (a, b) = tokio::join!(s.due_deliveries(8, 60), s.due_deliveries(8, 60));
        let mut got: Vec<Delivery> = a.unwrap().into_iter().chain(b.unwrap()).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        let first = got.pop().unwrap();
        assert_eq!(first.kind, "fine_tuning.job.paused");
        assert!(s.due_deliveries(8, 60).await.unwrap().is_empty(), "leased");
        s.delivered(&first.id).await.unwrap();
        let next = s.due_deliveries(8, 60).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].kind, "fine_tuning.job.cancelled");
        // A lease that ran out (a process died mid-delivery) makes it due again.
        s.delivery_failed(&next[0].id, now() - 1, "timed out")
            .await
            .unwrap();
        let again = s.due_deliveries(8, 0).await.unwrap();
        assert_eq!((again.len(), again[0].attempts), (1, 1));
    }
}
