CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    filename    TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    format      TEXT NOT NULL,
    examples    INTEGER NOT NULL,
    -- counted with a model's tokenizer when the upload names one (?model=)
    tokens      INTEGER,
    created_at  INTEGER NOT NULL
);

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    spec              TEXT NOT NULL,
    status            TEXT NOT NULL,
    priority          INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    error             TEXT,
    worker            TEXT,
    lease_until       INTEGER,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    step              INTEGER NOT NULL DEFAULT 0,
    total_steps       INTEGER,
    last_loss         REAL,
    tokens_per_second REAL,
    eta_seconds       REAL
);
CREATE INDEX jobs_queue ON jobs (status, priority DESC, created_at);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    type        TEXT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE checkpoints (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        INTEGER NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    loss        REAL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE artifacts (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);
