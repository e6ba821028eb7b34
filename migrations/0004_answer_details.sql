-- What an answer carries besides its text: the prompt tokens the server counted, the time it
-- waited for its endpoint's concurrency limit, the patient lines left out to fit the target's
-- context, a reasoning model's thinking (never rated), and the part that came as a refusal.
ALTER TABLE answers ADD COLUMN prompt_tokens BIGINT;
ALTER TABLE answers ADD COLUMN queue_ms BIGINT;
ALTER TABLE answers ADD COLUMN dropped_turns BIGINT;
ALTER TABLE answers ADD COLUMN reasoning TEXT;
ALTER TABLE answers ADD COLUMN refusal TEXT;
