-- API keys: every file and job belongs to the key that made it ('' is the anonymous owner of a
-- server without keys). Events, checkpoints and artifacts belong to their job.
ALTER TABLE files ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
CREATE INDEX files_owner ON files (owner);
CREATE INDEX jobs_owner ON jobs (owner, status);
