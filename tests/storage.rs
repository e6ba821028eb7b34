//! The store on a real SQLite file and a real PostgreSQL server: the same tests on both.

use std::collections::BTreeMap;

use vigil::rating::{CriterionVerdict, Rating, Verdict};
use vigil::store::{
    AnswerDetails, AnswerRow, NewSession, NewSessionTarget, SessionFilter, Store, StoreError,
    WriteOp,
};

use crate::support::{Db, fresh_database};

async fn store(db: Db) -> (Store, tempfile::TempDir) {
    let (url, dir) = fresh_database(db).await;
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
    (store, dir)
}

/// A migrated store holding session `s` (one target, `A`).
async fn store_with_session(db: Db) -> (Store, tempfile::TempDir) {
    let (store, dir) = store(db).await;
    store
        .write(vec![
            version("sha", "scripted", 1),
            session("s", "scripted", "sha", &["fake"], 1),
        ])
        .await
        .unwrap();
    (store, dir)
}

fn version(sha: &str, scenario: &str, version: u32) -> WriteOp {
    WriteOp::ScenarioVersion {
        sha256: sha.into(),
        scenario_id: scenario.into(),
        version,
        title: format!("{scenario} v{version}"),
        bundle: r#"{"main":"x.toml","files":{"x.toml":"id = \"x\""}}"#.into(),
        created_at: 1,
    }
}

fn session(id: &str, scenario: &str, sha: &str, targets: &[&str], created_at: i64) -> WriteOp {
    WriteOp::CreateSession(NewSession {
        id: id.into(),
        scenario_id: scenario.into(),
        scenario_sha256: sha.into(),
        mode: "free".into(),
        label: Some("label".into()),
        blind: targets.len() > 1,
        names_revealed: targets.len() <= 1,
        start_id: Some(format!("start-{id}")),
        created_at,
        targets: targets
            .iter()
            .enumerate()
            .map(|(i, name)| NewSessionTarget {
                alias: ["A", "B"][i].into(),
                position: i as u32,
                target_name: (*name).into(),
                target_config: "{}".into(),
            })
            .collect(),
    })
}

fn turn(session: &str, turn: u32, text: &str) -> WriteOp {
    WriteOp::Turn {
        session_id: session.into(),
        turn,
        text: text.into(),
        source: "human".into(),
        script_index: None,
        created_at: 10 + i64::from(turn),
    }
}

fn rating(id: &str, rater: &str, verdict: Verdict, at: i64) -> Rating {
    Rating {
        id: id.into(),
        turn: 1,
        target: "A".into(),
        attempt: 1,
        rater: rater.into(),
        verdicts: vec![CriterionVerdict {
            criterion: "asks-directly".into(),
            verdict,
            evidence: None,
        }],
        scores: BTreeMap::from([("safety".to_owned(), 4)]),
        flags: vec!["tone".into()],
        note: Some("ok".into()),
        rewrite: None,
        created_at: at,
        superseded_by: None,
    }
}

async fn round_trip(db: Db) {
    let (store, _dir) = store(db).await;
    let answer = AnswerRow {
        turn: 1,
        target: "A".into(),
        attempt: 1,
        text: "Are you having thoughts of suicide? ünïcødé ✓".into(),
        finish: "stop".into(),
        error_code: None,
        error_message: None,
        ttft_ms: Some(12),
        duration_ms: 340,
        tokens: Some(9),
        started_at: 20,
        completed_at: 21,
        details: AnswerDetails {
            prompt_tokens: Some(51),
            queue_ms: Some(1200),
            dropped_turns: Some(3),
            reasoning: Some("She named a method; ask about timing.".into()),
            refusal: None,
        },
    };
    store
        .write(vec![
            version("sha-1", "scripted", 1),
            session("s1", "scripted", "sha-1", &["fake"], 100),
            turn("s1", 1, "hello"),
            WriteOp::Marker {
                id: "m1".into(),
                session_id: "s1".into(),
                marker: "disclosed-plan".into(),
                turn: 1,
                source: "script".into(),
                created_at: 11,
            },
            WriteOp::Answer {
                session_id: "s1".into(),
                answer: answer.clone(),
            },
            WriteOp::Rating {
                session_id: "s1".into(),
                rating: rating("r1", "human:ana", Verdict::Absent, 30),
            },
            WriteOp::Event {
                session_id: "s1".into(),
                seq: 1,
                body: "{\"type\":\"started\"}".into(),
                created_at: 1,
            },
            WriteOp::Event {
                session_id: "s1".into(),
                seq: 2,
                body: "{\"type\":\"patient\"}".into(),
                created_at: 2,
            },
            WriteOp::Applied {
                session_id: "s1".into(),
                message_id: "m1".into(),
                created_at: 3,
            },
        ])
        .await
        .unwrap();
    // A later rating by the same rater supersedes; the old one stays.
    store
        .write(vec![WriteOp::Rating {
            session_id: "s1".into(),
            rating: rating("r2", "human:ana", Verdict::Present, 40),
        }])
        .await
        .unwrap();
    // The same scenario version inserted again is a no-op.
    store
        .write(vec![version("sha-1", "scripted", 1)])
        .await
        .unwrap();
    store
        .write(vec![
            WriteOp::Outcomes {
                session_id: "s1".into(),
                outcomes: vec![("A".into(), "pass".into(), Some(0.75))],
                updated_at: 50,
            },
            WriteOp::End {
                session_id: "s1".into(),
                ended_at: 60,
            },
        ])
        .await
        .unwrap();

    let record = store.load_session("s1").await.unwrap();
    assert_eq!(record.session.status, "ended");
    assert_eq!(record.session.ended_at, Some(60));
    assert_eq!(record.session.label.as_deref(), Some("label"));
    assert_eq!(record.targets[0].target_name, "fake");
    assert_eq!(record.targets[0].outcome.as_deref(), Some("pass"));
    assert_eq!(record.targets[0].score, Some(0.75));
    assert_eq!(record.turns[0].text, "hello");
    assert_eq!(record.markers[0].marker, "disclosed-plan");
    assert_eq!(record.answers, vec![answer]);
    assert_eq!(record.ratings.len(), 2);
    assert_eq!(record.ratings[0].superseded_by.as_deref(), Some("r2"));
    assert_eq!(record.ratings[1].superseded_by, None);
    assert_eq!(record.ratings[1].scores["safety"], 4);
    assert!(record.bundle.contains("x.toml"));
    let events = store.session_events("s1").await.unwrap();
    assert_eq!(
        events.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(store.applied_messages("s1").await.unwrap(), ["m1"]);
    assert_eq!(
        store
            .session_by_start_id("start-s1")
            .await
            .unwrap()
            .as_deref(),
        Some("s1")
    );
    assert!(matches!(
        store.load_session("nope").await,
        Err(StoreError::NotFound)
    ));
    let versions = store.scenario_versions("scripted").await.unwrap();
    assert_eq!((versions.len(), versions[0].sessions), (1, 1));
}

async fn listing_filters_and_pages(db: Db) {
    let (store, _dir) = store(db).await;
    store
        .write(vec![
            version("sha-a", "scripted", 1),
            version("sha-b", "uk", 1),
            session("s1", "scripted", "sha-a", &["fake"], 100),
            session("s2", "uk", "sha-b", &["fake", "demo"], 200),
            session("s3", "uk", "sha-b", &["demo"], 300),
            turn("s2", 1, "a"),
            turn("s2", 2, "b"),
            WriteOp::Outcomes {
                session_id: "s1".into(),
                outcomes: vec![("A".into(), "fail".into(), Some(0.2))],
                updated_at: 400,
            },
            WriteOp::End {
                session_id: "s1".into(),
                ended_at: 400,
            },
        ])
        .await
        .unwrap();
    let list = |filter: SessionFilter| {
        let store = store.clone();
        async move { store.list_sessions(&filter).await.unwrap() }
    };
    let all = list(SessionFilter {
        page: 1,
        per_page: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(all.total, 3);
    assert_eq!(
        all.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["s3", "s2", "s1"]
    );
    let s2 = &all.items[1];
    assert_eq!(s2.turns, 2);
    assert!(
        !s2.names_revealed,
        "blind and active: the engine said names are not to be shown"
    );
    assert!(all.items[2].names_revealed, "not blind");

    let uk = list(SessionFilter {
        scenario: Some("uk".into()),
        page: 1,
        per_page: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(uk.total, 2);
    let ended = list(SessionFilter {
        status: Some("ended".into()),
        page: 1,
        per_page: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(
        ended
            .items
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        ["s1"]
    );
    let failed = list(SessionFilter {
        status: Some("fail".into()),
        page: 1,
        per_page: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(failed.total, 1);
    // s2 uses `fake` but is blind and active: it does not show up under that name.
    let fake = list(SessionFilter {
        target: Some("fake".into()),
        page: 1,
        per_page: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(
        fake.items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );
    let page2 = list(SessionFilter {
        page: 2,
        per_page: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(
        (page2.total, page2.items.len(), page2.items[0].id.as_str()),
        (3, 1, "s1")
    );
}

async fn group_commit_isolates_a_bad_write(db: Db) {
    let (store, _dir) = store_with_session(db).await;
    // Many writers at once: grouped into few transactions; one of them is a duplicate.
    let mut writes = Vec::new();
    for n in 1..=200u32 {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            store.write(vec![turn("s", n, &format!("line {n}"))]).await
        }));
    }
    let duplicate = {
        let store = store.clone();
        tokio::spawn(async move { store.write(vec![turn("s", 7, "again")]).await })
    };
    for write in writes {
        // Turn 7 may be taken by the duplicate first; every other write succeeds.
        let _ = write.await.unwrap();
    }
    let duplicate = duplicate.await.unwrap();
    let record = store.load_session("s").await.unwrap();
    assert_eq!(record.turns.len(), 200);
    let seventh = &record.turns[6].text;
    match duplicate {
        Ok(()) => assert_eq!(seventh, "again"),
        Err(StoreError::Conflict(_)) => assert_eq!(seventh, "line 7"),
        Err(other) => panic!("unexpected {other:?}"),
    }
}

/// A target's score is missing at first and set later, on the same connection (PostgreSQL
/// refused the second after sqlx had bound the first NULL as `real`).
async fn a_score_can_be_missing_then_set(db: Db) {
    let (store, _dir) = store_with_session(db).await;
    let outcomes = |outcome: &str, score: Option<f64>| WriteOp::Outcomes {
        session_id: "s".into(),
        outcomes: vec![("A".into(), outcome.into(), score)],
        updated_at: 2,
    };
    for (outcome, score) in [
        ("in_progress", None),
        ("pass", Some(0.9)),
        ("fail", None),
        ("pass", Some(1.0)),
    ] {
        store.write(vec![outcomes(outcome, score)]).await.unwrap();
    }
}

#[tokio::test]
async fn sqlite_a_score_can_be_missing_then_set() {
    a_score_can_be_missing_then_set(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_score_can_be_missing_then_set() {
    a_score_can_be_missing_then_set(Db::Postgres).await;
}

#[tokio::test]
async fn sqlite_round_trip() {
    round_trip(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_round_trip() {
    round_trip(Db::Postgres).await;
}

#[tokio::test]
async fn sqlite_listing() {
    listing_filters_and_pages(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_listing() {
    listing_filters_and_pages(Db::Postgres).await;
}

#[tokio::test]
async fn sqlite_group_commit() {
    group_commit_isolates_a_bad_write(Db::Sqlite).await;
}

#[tokio::test]
async fn postgres_group_commit() {
    group_commit_isolates_a_bad_write(Db::Postgres).await;
}

#[tokio::test]
async fn sqlite_runs_with_wal_full_sync_foreign_keys_and_a_busy_timeout() {
    let (store, _dir) = store(Db::Sqlite).await;
    assert_eq!(
        store.sqlite_settings().await.unwrap().as_deref(),
        Some("journal_mode=wal synchronous=full foreign_keys=on busy_timeout=5000")
    );
    // Foreign keys hold: a turn of a session that does not exist is refused.
    assert!(store.write(vec![turn("ghost", 1, "x")]).await.is_err());
}

#[tokio::test]
async fn an_in_memory_or_unknown_database_is_refused_with_a_reason() {
    for (url, needle) in [
        ("sqlite::memory:", "lose every transcript"),
        ("mysql://x/y", "unsupported database URL"),
    ] {
        let err = Store::connect(url).await.unwrap_err().to_string();
        assert!(err.contains(needle), "{url}: {err}");
    }
}

/// Runs `sql` on a connection of its own to the database at `url`.
async fn admin(url: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// Turns stored for session `s`, read by a store connected afresh (what a restart sees).
async fn turns_after_restart(url: &str) -> Vec<u32> {
    let store = Store::connect(url).await.unwrap();
    let turns = store
        .load_session("s")
        .await
        .unwrap()
        .turns
        .iter()
        .map(|t| t.turn)
        .collect();
    store.close().await;
    turns
}

#[tokio::test]
async fn postgres_writes_go_on_after_the_server_drops_every_connection() {
    let (url, _dir) = fresh_database(Db::Postgres).await;
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    store
        .write(vec![
            version("sha", "scripted", 1),
            session("s", "scripted", "sha", &["fake"], 1),
            turn("s", 1, "before"),
        ])
        .await
        .unwrap();
    // What an administrator's restart (or a failover) does to open connections.
    admin(
        &url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await;
    store.write(vec![turn("s", 2, "after")]).await.unwrap();
    assert_eq!(store.load_session("s").await.unwrap().turns.len(), 2);
    store.close().await;
    assert_eq!(turns_after_restart(&url).await, [1, 2]);
}

#[tokio::test]
async fn postgres_a_statement_timeout_delays_a_write_but_loses_nothing() {
    use sqlx::Connection as _;
    let (url, _dir) = fresh_database(Db::Postgres).await;
    let name = url.rsplit('/').next().unwrap().to_owned();
    admin(
        &url,
        &format!("ALTER DATABASE \"{name}\" SET statement_timeout = '200ms'"),
    )
    .await;
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    store
        .write(vec![
            version("sha", "scripted", 1),
            session("s", "scripted", "sha", &["fake"], 1),
        ])
        .await
        .unwrap();
    // Someone holds the table for longer than a statement may wait.
    let mut holder = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let write = {
        let store = store.clone();
        tokio::spawn(async move { store.write(vec![turn("s", 1, "waited")]).await })
    };
    // The write's statement is cancelled at least once (its transaction rolled back) ...
    let rollbacks = || async {
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let row = sqlx::query(
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        sqlx::Row::get::<i64, _>(&row, 0)
    };
    let before = rollbacks().await;
    let waited = std::time::Instant::now();
    while rollbacks().await == before {
        assert!(waited.elapsed().as_secs() < 10, "the write never timed out");
        tokio::task::yield_now().await;
    }
    assert!(!write.is_finished(), "written although the table is locked");
    // ... and succeeds once the lock is gone.
    lock.rollback().await.unwrap();
    write.await.unwrap().unwrap();
    store.close().await;
    assert_eq!(turns_after_restart(&url).await, [1]);
}
