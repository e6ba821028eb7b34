-- Regenerated answers, markers taken back, and who may see target names.
--
-- answers: every attempt of a target at a turn is kept (`regenerate` adds one beside the failed
-- answer); ratings say which attempt they rate. Tables are rebuilt under a new name and renamed,
-- which works the same on SQLite and PostgreSQL (and keeps PostgreSQL's index names unique).

CREATE TABLE answers_v2 (
    session_id    TEXT NOT NULL REFERENCES sessions (id),
    turn          BIGINT NOT NULL,
    target_alias  TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    text          TEXT NOT NULL,
    finish        TEXT NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    ttft_ms       BIGINT,
    duration_ms   BIGINT NOT NULL,
    tokens        BIGINT,
    started_at    BIGINT NOT NULL,
    completed_at  BIGINT NOT NULL,
    PRIMARY KEY (session_id, turn, target_alias, attempt)
);
INSERT INTO answers_v2 (session_id, turn, target_alias, attempt, text, finish, error_code,
    error_message, ttft_ms, duration_ms, tokens, started_at, completed_at)
SELECT session_id, turn, target_alias, 1, text, finish, error_code, error_message, ttft_ms,
    duration_ms, tokens, started_at, completed_at FROM answers;
DROP TABLE answers;
ALTER TABLE answers_v2 RENAME TO answers;

ALTER TABLE ratings ADD COLUMN attempt BIGINT NOT NULL DEFAULT 1;

-- markers: a marker taken back (`unmark`) keeps its row, with who took it back and when.
CREATE TABLE markers_v2 (
    id         TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    marker     TEXT NOT NULL,
    turn       BIGINT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    removed_at BIGINT,
    removed_by TEXT
);
INSERT INTO markers_v2 (id, session_id, marker, turn, source, created_at)
SELECT session_id || ':' || marker || ':' || CAST(turn AS TEXT), session_id, marker, turn, source,
    created_at FROM markers;
DROP TABLE markers;
ALTER TABLE markers_v2 RENAME TO markers;
CREATE INDEX markers_by_session ON markers (session_id, turn);

-- Whether target names may be shown: set by the engine (not blind, or ended), so the store
-- filters by it without knowing the rule.
ALTER TABLE sessions ADD COLUMN names_revealed BIGINT NOT NULL DEFAULT 0;
UPDATE sessions SET names_revealed = CASE WHEN blind = 0 OR status = 'ended' THEN 1 ELSE 0 END;
