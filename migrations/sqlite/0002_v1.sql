-- The OpenAI-shaped API (/v1): a job's suffix and metadata; and the tokens a job has trained on.
ALTER TABLE jobs ADD COLUMN suffix TEXT;
ALTER TABLE jobs ADD COLUMN metadata TEXT;
ALTER TABLE jobs ADD COLUMN trained_tokens INTEGER NOT NULL DEFAULT 0;
