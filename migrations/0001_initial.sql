-- Vigil's schema, portable between SQLite and PostgreSQL: ids are text (UUIDs), times are UTC
-- milliseconds (BIGINT), structured fields are JSON text. Nothing is ever updated in place
-- except session status, cached outcomes and a rating's `superseded_by` pointer.

CREATE TABLE scenario_versions (
    sha256      TEXT PRIMARY KEY,
    scenario_id TEXT NOT NULL,
    version     BIGINT NOT NULL,
    title       TEXT NOT NULL,
    -- JSON: {"main": "x.toml", "files": {"x.toml": "...", "criteria/core.toml": "..."}}
    bundle      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX scenario_versions_by_scenario ON scenario_versions (scenario_id, version);

CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    scenario_id     TEXT NOT NULL,
    scenario_sha256 TEXT NOT NULL REFERENCES scenario_versions (sha256),
    mode            TEXT NOT NULL,
    label           TEXT,
    blind           BIGINT NOT NULL,
    status          TEXT NOT NULL,
    -- the client's id of the `start` message, so a resent start opens the same session
    start_id        TEXT UNIQUE,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    ended_at        BIGINT
);
CREATE INDEX sessions_by_created ON sessions (created_at);
CREATE INDEX sessions_by_scenario ON sessions (scenario_id, created_at);

CREATE TABLE session_targets (
    session_id    TEXT NOT NULL REFERENCES sessions (id),
    alias         TEXT NOT NULL,
    position      BIGINT NOT NULL,
    target_name   TEXT NOT NULL,
    -- JSON snapshot of the target's configuration (API keys are never part of it)
    target_config TEXT NOT NULL,
    outcome       TEXT,
    score         DOUBLE PRECISION,
    PRIMARY KEY (session_id, alias)
);
CREATE INDEX session_targets_by_name ON session_targets (target_name);

CREATE TABLE turns (
    session_id   TEXT NOT NULL REFERENCES sessions (id),
    turn         BIGINT NOT NULL,
    text         TEXT NOT NULL,
    source       TEXT NOT NULL,
    script_index BIGINT,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (session_id, turn)
);

CREATE TABLE markers (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    marker     TEXT NOT NULL,
    turn       BIGINT NOT NULL,
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, marker, turn)
);

CREATE TABLE answers (
    session_id    TEXT NOT NULL REFERENCES sessions (id),
    turn          BIGINT NOT NULL,
    target_alias  TEXT NOT NULL,
    text          TEXT NOT NULL,
    finish        TEXT NOT NULL,
    error_code    TEXT,
    error_message TEXT,
    ttft_ms       BIGINT,
    duration_ms   BIGINT NOT NULL,
    tokens        BIGINT,
    started_at    BIGINT NOT NULL,
    completed_at  BIGINT NOT NULL,
    PRIMARY KEY (session_id, turn, target_alias)
);

CREATE TABLE ratings (
    id            TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL REFERENCES sessions (id),
    turn          BIGINT NOT NULL,
    target_alias  TEXT NOT NULL,
    rater         TEXT NOT NULL,
    verdicts      TEXT NOT NULL,
    scores        TEXT NOT NULL,
    flags         TEXT NOT NULL,
    note          TEXT,
    rewrite       TEXT,
    created_at    BIGINT NOT NULL,
    superseded_by TEXT
);
CREATE INDEX ratings_by_answer ON ratings (session_id, turn, target_alias);

CREATE TABLE preferences (
    id           TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL REFERENCES sessions (id),
    turn         BIGINT NOT NULL,
    target_alias TEXT NOT NULL,
    rater        TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX preferences_by_session ON preferences (session_id, turn);

-- The session's durable protocol events, in order, so a client can resume by `seq` even
-- after the server restarted.
CREATE TABLE session_events (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    seq        BIGINT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- Client message ids already applied, so a message resent after a reconnect is acknowledged
-- and never applied twice.
CREATE TABLE applied_messages (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    message_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, message_id)
);
