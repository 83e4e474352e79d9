-- The PostgreSQL schema: SQLite's 0001 to 0005 in one, with 64-bit integers and an explicit
-- `rowid` (SQLite's implicit one) where lists page by insertion order. Later migrations keep
-- the two directories in step.
CREATE TABLE files (
    rowid       BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id          TEXT PRIMARY KEY,
    filename    TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    format      TEXT NOT NULL,
    examples    BIGINT NOT NULL,
    tokens      BIGINT,
    created_at  BIGINT NOT NULL,
    owner       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX files_owner ON files (owner);

CREATE TABLE jobs (
    rowid             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                TEXT PRIMARY KEY,
    spec              TEXT NOT NULL,
    status            TEXT NOT NULL,
    priority          BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    error             TEXT,
    worker            TEXT,
    lease_until       BIGINT,
    cancel_requested  BIGINT NOT NULL DEFAULT 0,
    attempts          BIGINT NOT NULL DEFAULT 0,
    step              BIGINT NOT NULL DEFAULT 0,
    total_steps       BIGINT,
    last_loss         DOUBLE PRECISION,
    tokens_per_second DOUBLE PRECISION,
    eta_seconds       DOUBLE PRECISION,
    suffix            TEXT,
    metadata          TEXT,
    trained_tokens    BIGINT NOT NULL DEFAULT 0,
    owner             TEXT NOT NULL DEFAULT '',
    result_files      TEXT
);
CREATE INDEX jobs_queue ON jobs (status, priority DESC, created_at);
CREATE INDEX jobs_owner ON jobs (owner, status);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    type        TEXT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- Every stored event is announced to every API process (`LISTEN qlorad_events`) when its
-- transaction commits: the payload is `<job id> <seq> <status or empty>`; the event itself is
-- read back.
CREATE FUNCTION qlorad_notify_event() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('qlorad_events',
        NEW.job_id || ' ' || NEW.seq || ' ' || COALESCE(NEW.data::jsonb ->> 'status', ''));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
    FOR EACH ROW EXECUTE FUNCTION qlorad_notify_event();

CREATE TABLE checkpoints (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        BIGINT NOT NULL,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    loss        DOUBLE PRECISION,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE artifacts (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE webhook_outbox (
    rowid        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id           TEXT PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    type         TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL,
    delivered_at BIGINT,
    last_error   TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (delivered_at, next_at);
