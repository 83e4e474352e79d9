-- Webhook deliveries: one row per (job status event, endpoint), written in the transaction that
-- changes the job's status and delivered at least once by the server's deliverer. The id is the
-- `webhook-id` of every attempt.
CREATE TABLE webhook_outbox (
    id           TEXT PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    type         TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER NOT NULL,
    delivered_at INTEGER,
    last_error   TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (delivered_at, next_at);
