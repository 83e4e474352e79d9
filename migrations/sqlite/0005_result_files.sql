-- A succeeded job's result files (OpenAI's `result_files`): file ids, as a JSON array.
ALTER TABLE jobs ADD COLUMN result_files TEXT;
