//! Bad input and failing models: each gets a clear error event, nothing recorded is lost, and
//! the connection and the session stay usable.

use serde_json::{Value, json};

use crate::support::{Db, Gate, Reply, spawn_app, spawn_app_with, verdict_of};
use vigil::config::TargetConfig;

#[tokio::test]
async fn every_kind_of_bad_input_gets_its_error_and_the_connection_stays_usable() {
    let app = spawn_app().await;
    let mut ws = app.ws().await;

    ws.send_raw("{not json").await;
    ws.error_for(None, "invalid_json").await;
    ws.send_raw("[1, 2]").await;
    ws.error_for(None, "invalid_message").await;
    ws.send(json!({"type": "shout", "id": "m1"})).await;
    let err = ws.error_for(Some("m1"), "unknown_type").await;
    assert!(err["message"].as_str().unwrap().contains("shout"));
    ws.send(json!({"type": "say", "id": "m2"})).await;
    let err = ws.error_for(Some("m2"), "invalid_message").await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("missing field `text`"),
        "{err}"
    );
    ws.send_binary(vec![1, 2, 3]).await;
    ws.error_for(None, "invalid_message").await;
    ws.send(json!({"type": "say", "id": "m3", "text": "hello"}))
        .await;
    ws.error_for(Some("m3"), "no_session").await;
    ws.send(json!({"type": "resume", "id": "m3b", "session": "no-such-session"}))
        .await;
    ws.error_for(Some("m3b"), "unknown_session").await;
    ws.send(json!({"type": "start", "id": "m4", "scenario": "nope", "targets": ["demo"]}))
        .await;
    let err = ws.error_for(Some("m4"), "unknown_scenario").await;
    assert!(
        err["message"].as_str().unwrap().contains("scripted"),
        "lists what exists: {err}"
    );
    ws.send(json!({"type": "start", "id": "m5", "scenario": "scripted", "targets": ["gpt-99"]}))
        .await;
    ws.error_for(Some("m5"), "unknown_target").await;
    ws.send(json!({"type": "start", "id": "m6", "scenario": "scripted", "targets": ["demo"], "mode": "telepathic"})).await;
    ws.error_for(Some("m6"), "invalid_message").await;
    ws.send(json!({"type": "start", "id": "m7", "scenario": "scripted", "targets": []}))
        .await;
    ws.error_for(Some("m7"), "no_targets").await;

    ws.start("scripted", &["fake"], "free").await;
    ws.send(json!({"type": "say", "id": "m8", "text": "x".repeat(4_001)}))
        .await;
    let err = ws.error_for(Some("m8"), "text_too_long").await;
    assert!(err["message"].as_str().unwrap().contains("4001"), "{err}");
    // A large frame (within the WebSocket limit) is answered the same way.
    ws.send(json!({"type": "say", "id": "m9", "text": "y".repeat(60_000)}))
        .await;
    ws.error_for(Some("m9"), "text_too_long").await;
    ws.send(json!({"type": "say", "id": "m10", "text": "   "}))
        .await;
    ws.error_for(Some("m10"), "text_empty").await;
    ws.send(json!({"type": "next", "id": "m11"})).await;
    ws.error_for(Some("m11"), "not_scripted").await;

    let gate = Gate::new();
    app.upstream.push(
        "fake",
        Reply::Gated(vec!["One ".into()], gate.clone(), vec!["moment.".into()]),
    );
    ws.say("first").await;
    ws.next_of("delta").await;
    ws.send(json!({"type": "say", "id": "m12", "text": "second"}))
        .await;
    ws.error_for(Some("m12"), "answers_streaming").await;
    gate.open();
    ws.answers(1, &["A"]).await;

    // Nothing above broke the session: it goes on.
    ws.say("still here").await;
    let answers = ws.answers(2, &["A"]).await;
    assert_eq!(answers[0]["finish"], "stop");
    app.stop().await;
}

/// Starts `fake` (failing as scripted) beside `demo` (fine), not blind so `A` is `fake`.
async fn start_pair(ws: &mut crate::support::WsClient, failing: &str) -> String {
    let id = ws.id();
    ws.send(json!({"type": "start", "id": id, "scenario": "scripted", "targets": [failing, "demo"], "mode": "free", "blind": false})).await;
    let started = ws.next_of("started").await;
    ws.ack(&id).await;
    assert_eq!(started["targets"][0]["name"], failing);
    started["session"].as_str().unwrap().to_owned()
}

/// Checks the answer of `A` failed with `code` keeping `partial`, and `B` was unaffected.
async fn expect_failure(
    ws: &mut crate::support::WsClient,
    turn: u64,
    code: &str,
    partial: &str,
) -> Value {
    let answers = ws.answers(turn, &["A", "B"]).await;
    let failed = &answers[0];
    assert_eq!(failed["finish"], "error", "{failed}");
    assert_eq!(failed["error"]["code"], code, "{failed}");
    assert_eq!(failed["text"], partial, "{failed}");
    let error = ws
        .seen
        .iter()
        .find(|e| e["type"] == "error" && e["turn"] == turn && e["target"] == "A")
        .unwrap_or_else(|| panic!("no error event for turn {turn}"))
        .clone();
    assert_eq!(error["code"], code);
    assert!(
        error["seq"].as_u64().is_some(),
        "target errors are part of the record: {error}"
    );
    assert!(error["message"].as_str().unwrap().len() > 15, "{error}");
    assert_eq!(
        answers[1]["finish"], "stop",
        "the other target is unaffected: {}",
        answers[1]
    );
    error
}

#[tokio::test]
async fn each_target_failure_is_an_error_for_that_target_and_turn_and_the_session_goes_on() {
    let app = spawn_app().await;
    let mut ws = app.ws().await;
    let session = start_pair(&mut ws, "fake").await;

    let cases: Vec<(Reply, &str, &str)> = vec![
        (Reply::NoFirstToken, "target_first_token_timeout", ""),
        (
            Reply::StallAfter(vec!["I am ".into(), "here ".into()]),
            "target_stalled",
            "I am here ",
        ),
        (
            Reply::Status(
                401,
                r#"{"error":{"message":"Incorrect API key provided"}}"#.into(),
            ),
            "target_auth_failed",
            "",
        ),
        (
            Reply::Status(429, r#"{"error":{"message":"Rate limit reached"}}"#.into()),
            "target_rate_limited",
            "",
        ),
        (
            Reply::Status(500, "upstream exploded".into()),
            "target_http_error",
            "",
        ),
        (
            Reply::Malformed(vec!["Hello ".into()]),
            "target_malformed_stream",
            "Hello ",
        ),
        (
            Reply::CutAfter(vec!["Hel".into()]),
            "target_truncated",
            "Hel",
        ),
        // An answer the server ended without saying why is cut short, not complete.
        (
            Reply::NoFinish(vec!["Hel".into()]),
            "target_truncated",
            "Hel",
        ),
        // Nothing said is never a complete answer.
        (Reply::EmptyStop, "target_empty_answer", ""),
        // An error object in the stream (vLLM, OpenRouter) ends the answer, its text kept.
        (
            Reply::Raw(vec![
                b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n".to_vec(),
                b"data: {\"error\":{\"message\":\"upstream overloaded\",\"code\":502}}\n\n"
                    .to_vec(),
            ]),
            "target_malformed_stream",
            "Hel",
        ),
        // A line that never ends is cut at the line limit, not buffered for ever.
        (
            Reply::EndlessLine(vec!["Hi ".into()]),
            "target_malformed_stream",
            "Hi ",
        ),
    ];
    for (turn, (reply, code, partial)) in (1u64..).zip(cases) {
        app.upstream.push("fake", reply);
        ws.say(&format!("line {turn}")).await;
        let error = expect_failure(&mut ws, turn, code, partial).await;
        // Even an answer that failed is rated: what it did say is judged, and a required
        // behaviour it never got to show is `unsure`, not `absent`.
        let rating = ws.rules_rating(turn, "A").clone();
        assert_eq!(
            verdict_of(&rating, "stigmatising-language").as_deref(),
            Some("absent"),
            "{rating}"
        );
        assert_eq!(
            verdict_of(&rating, "offers-local-resource").as_deref(),
            Some("unsure"),
            "{rating}"
        );
        if code == "target_auth_failed" {
            assert!(
                error["message"]
                    .as_str()
                    .unwrap()
                    .contains("Incorrect API key provided"),
                "{error}"
            );
        }
    }
    // The partial text of a failed answer is rated like any text.
    let (_, stored) = app.get(&format!("/api/sessions/{session}")).await;
    let turns = stored["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 11);
    let stalled = turns[1]["answers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["target"] == "A")
        .unwrap();
    assert_eq!(
        (stalled["text"].as_str(), stalled["finish"].as_str()),
        (Some("I am here "), Some("error"))
    );
    assert_eq!(stalled["error_code"], "target_stalled");

    // And after all that, the target answers again.
    ws.say("are you back?").await;
    let answers = ws.answers(12, &["A", "B"]).await;
    assert_eq!(answers[0]["finish"], "stop");
    app.stop().await;
}

#[tokio::test]
async fn a_refused_connection_is_an_error_and_a_missing_key_makes_a_target_unavailable() {
    let app = spawn_app_with(Db::Sqlite, |config| {
        // Nothing listens on port 9 of this machine.
        let mut dead = TargetConfig::openai("dead", "http://127.0.0.1:9/v1", "dead");
        dead.retries = 1;
        config.targets.push(dead);
        let mut keyless = TargetConfig::openai("keyless", "http://127.0.0.1:9/v1", "m");
        keyless.api_key_env = Some("VIGIL_TEST_KEY_THAT_IS_NOT_SET".into());
        config.targets.push(keyless);
    })
    .await;
    let mut ws = app.ws().await;
    start_pair(&mut ws, "dead").await;
    ws.say("hello").await;
    expect_failure(&mut ws, 1, "target_connect_failed", "").await;

    let (_, targets) = app.get("/api/targets").await;
    let keyless = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "keyless")
        .unwrap();
    assert!(
        keyless["unavailable"]
            .as_str()
            .unwrap()
            .contains("VIGIL_TEST_KEY_THAT_IS_NOT_SET")
    );
    ws.send(json!({"type": "start", "id": "k", "scenario": "scripted", "targets": ["keyless"]}))
        .await;
    ws.error_for(Some("k"), "target_unavailable").await;
    app.stop().await;
}

#[tokio::test]
async fn a_rate_limit_before_the_first_byte_is_retried() {
    let app = spawn_app_with(Db::Sqlite, |config| {
        for target in &mut config.targets {
            target.retries = 2;
        }
    })
    .await;
    app.upstream
        .push("fake", Reply::Status(429, "slow down".into()));
    app.upstream
        .push("fake", Reply::Status(503, "warming up".into()));
    app.upstream
        .push("fake", Reply::Text("Third time lucky.".into()));
    let mut ws = app.ws().await;
    ws.start("scripted", &["fake"], "free").await;
    ws.say("hello").await;
    let answers = ws.answers(1, &["A"]).await;
    assert_eq!(
        (answers[0]["finish"].as_str(), answers[0]["text"].as_str()),
        (Some("stop"), Some("Third time lucky."))
    );
    assert_eq!(app.upstream.requests("fake").len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009_and_invalid_utf8_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, coding::Data, coding::OpCode};
    let app = spawn_app().await;
    for (bytes, opcode, expected) in [
        (vec![b'x'; 70 * 1024], OpCode::Data(Data::Text), 1009),
        (vec![0xff, 0xfe, 0x41], OpCode::Data(Data::Text), 1007),
    ] {
        let mut ws = app.ws().await;
        ws.send_frame(Frame::message(bytes, opcode, true)).await;
        let code = ws.close_code().await;
        assert_eq!(code, Some(expected));
    }
    // The server goes on serving.
    let mut ws = app.ws().await;
    ws.start("scripted", &["demo"], "free").await;
    app.stop().await;
}

#[tokio::test]
async fn only_this_servers_pages_open_the_websocket_and_only_its_host_names_are_served() {
    let app = spawn_app().await;
    let address = app.address;
    for origin in [
        Some("https://evil.example"),
        Some("null"),
        None,
        Some("http://127.0.0.1:1"),
    ] {
        let refused =
            tokio_tungstenite::connect_async(crate::support::upgrade_request(address, "", origin))
                .await
                .expect_err("the upgrade is refused");
        match refused {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert_eq!(response.status(), 403, "origin {origin:?}")
            }
            other => panic!("origin {origin:?}: {other}"),
        }
    }
    // Its own pages, under either of its names.
    for origin in [
        format!("http://{address}"),
        format!("http://localhost:{}", address.port()),
    ] {
        tokio_tungstenite::connect_async(crate::support::upgrade_request(
            address,
            "",
            Some(&origin),
        ))
        .await
        .unwrap_or_else(|e| panic!("{origin}: {e}"));
    }

    // DNS rebinding: the API under a name this server does not serve.
    let client = reqwest::Client::new();
    for path in ["/api/sessions", "/", "/healthz", "/ws"] {
        let response = client
            .get(app.url(path))
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "forbidden_host", "{path}");
    }
    let response = client
        .get(format!("http://localhost:{}/healthz", address.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_message_id_from_another_client_never_reaches_someone_elses_session() {
    let app = spawn_app().await;
    let mut owner = crate::support::WsClient::connect_client(app.address, "tab-owner").await;
    owner
        .send(json!({"type": "start", "id": "c1", "scenario": "scripted", "targets": ["demo"]}))
        .await;
    let mine = owner.next_of("started").await["session"].clone();
    owner.ack("c1").await;
    owner.say("a line only the owner should see").await;

    // Another client, with the id the protocol's own examples use.
    let mut other = app.ws().await;
    other
        .send(json!({"type": "start", "id": "c1", "scenario": "uk", "targets": ["demo"]}))
        .await;
    let started = other.next_of("started").await;
    other.ack("c1").await;
    assert_ne!(
        started["session"], mine,
        "attached to someone else's session"
    );
    assert_eq!(started["scenario"]["id"], "uk");
    assert!(
        other.seen.iter().all(|e| e["type"] != "patient"),
        "{:?}",
        other.seen
    );
    app.stop().await;
}

#[tokio::test]
async fn an_api_key_an_upstream_echoes_is_never_stored_or_shown() {
    use crate::support::{FakeUpstream, WsClient, binary::start_vigil, binary_config};
    const KEY: &str = "sk-test-4f9a1c2e7b3d";
    vigil::tls::install_provider();
    let upstream = FakeUpstream::start().await;
    upstream.push("fake", Reply::EchoAuth(401));
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(
        dir.path(),
        &upstream.url,
        "api_key_env = \"VIGIL_TEST_KEY\"\n",
    );
    let (mut child, address) = start_vigil(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vigil")),
        &config,
        &[("VIGIL_TEST_KEY", KEY.to_owned())],
    )
    .await;
    let mut ws = WsClient::connect(address).await;
    let session = ws.start("scripted", &["fake"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.say("hello").await;
    let answer = ws.answers(1, &["A"]).await.remove(0);
    assert_eq!(answer["error"]["code"], "target_auth_failed", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("[redacted]"), "{message}");
    assert!(
        ws.seen.iter().all(|e| !e.to_string().contains(KEY)),
        "shown"
    );
    let stored = reqwest::get(format!("http://{address}/api/sessions/{session}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!stored.contains(KEY), "stored: {stored}");
    let database = std::fs::read(dir.path().join("vigil.db")).unwrap_or_default();
    let wal = std::fs::read(dir.path().join("vigil.db-wal")).unwrap_or_default();
    for bytes in [database, wal] {
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "the key is in the database files"
        );
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn one_person_cannot_fill_the_server_and_unused_sessions_leave_memory() {
    use crate::support::WsClient;
    let app = spawn_app_with(Db::Sqlite, |c| c.server.max_sessions_per_person = 2).await;
    let mut ana = Vec::new();
    for _ in 0..2 {
        let mut ws = WsClient::connect_as(app.address, "Ana").await;
        ws.start("scripted", &["demo"], "free").await;
        ana.push(ws);
    }
    let mut third = WsClient::connect_as(app.address, "Ana").await;
    third
        .refused(
            json!({"type": "start", "scenario": "scripted", "targets": ["demo"]}),
            "too_many_sessions",
        )
        .await;
    // Somebody else is not locked out.
    let mut ben = WsClient::connect_as(app.address, "Ben").await;
    ben.start("scripted", &["demo"], "free").await;

    // Ana leaves without using them: her sessions leave memory, and she can start again.
    for ws in ana {
        ws.close().await;
    }
    app.wait_for_live_sessions(1, std::time::Duration::from_secs(15))
        .await;
    third.start("scripted", &["demo"], "free").await;
    app.stop().await;
}

#[tokio::test]
async fn an_ended_session_leaves_memory_when_its_viewer_leaves_and_comes_back_whole() {
    let app = spawn_app().await;
    let mut ws = app.ws().await;
    let session = ws.start("scripted", &["demo"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.say("nothing feels worth it anymore").await;
    ws.answers(1, &["A"]).await;
    ws.end().await;
    // Still viewed: still in memory.
    let (_, health) = app.get("/healthz").await;
    assert_eq!(health["live_sessions"], 1, "{health}");
    ws.close().await;
    app.wait_for_live_sessions(0, std::time::Duration::from_secs(2))
        .await;
    // A reviewer opening it later finds it whole.
    let mut reviewer = app.ws().await;
    reviewer
        .send(json!({"type": "resume", "session": session, "after_seq": 0}))
        .await;
    let answer = reviewer.next_of("answer").await;
    assert_eq!(answer["turn"], 1, "{answer}");
    reviewer.next_of("ended").await;
    app.stop().await;
}

#[tokio::test]
async fn an_answer_past_its_targets_limit_is_cut_there_kept_and_said_so() {
    let app = spawn_app_with(Db::Sqlite, |c| {
        for t in &mut c.targets {
            t.max_answer_chars = 100;
        }
    })
    .await;
    app.upstream
        .push("fake", Reply::Text("word ".repeat(1_000)));
    let mut ws = app.ws().await;
    ws.start("scripted", &["fake"], "free").await;
    ws.say("talk to me").await;
    let answer = ws.answers(1, &["A"]).await.remove(0);
    assert_eq!(answer["finish"], "truncated", "{answer}");
    assert_eq!(answer["text"].as_str().unwrap().chars().count(), 100);
    assert_eq!(answer["error"]["code"], "answer_too_long");
    // The session goes on.
    ws.say("still there?").await;
    assert_eq!(ws.answers(2, &["A"]).await[0]["finish"], "stop");
    app.stop().await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_give_way_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(Db::Sqlite, |config| {
        config.server.header_timeout_secs = 1;
        config.server.max_connections = 60;
    })
    .await;
    // Slowloris: 40 connections that start a request and never finish its headers.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut socket = tokio::net::TcpStream::connect(app.address).await.unwrap();
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(socket);
    }
    // The server still answers while they hang.
    let (status, body) = app.get("/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    // Each is closed by the server once its headers are late (EOF, or a 408 and then EOF).
    let started = std::time::Instant::now();
    for socket in &mut slow {
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            socket.read_to_end(&mut rest),
        )
        .await
        .expect("a slow connection stayed open")
        .ok();
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // Slow connections holding every place: a health check takes the oldest one's place.
    let mut slow = Vec::new();
    for _ in 0..60 {
        let mut socket = tokio::net::TcpStream::connect(app.address).await.unwrap();
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(socket);
    }
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    slow[0].read_to_end(&mut rest).await.ok();
    drop(slow);

    // More connections than the cap (WebSockets count too): one over it gets no answer, its
    // socket is closed at once; the open ones are unaffected.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(app.ws().await);
    }
    let mut over = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        over.read_to_end(&mut response),
    )
    .await
    .expect("a connection over the cap was kept open");
    assert!(
        response.is_empty(),
        "{}",
        String::from_utf8_lossy(&response)
    );
    idle[0].start("scripted", &["fake"], "free").await;
    drop(idle);
    // Once they are gone, the server is fully usable again, WebSockets included.
    let mut answered = false;
    for _ in 0..50 {
        if let Ok(response) = reqwest::get(app.url("/healthz")).await {
            answered = response.status() == 200;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(answered);
    let mut ws = app.ws().await;
    ws.start("scripted", &["fake"], "free").await;
    app.stop().await;
}

/// Sends `count` ratings of turn 1 at once with ids `{prefix}{n}`; returns (acked, refused).
async fn rate_flood(
    ws: &mut crate::support::WsClient,
    prefix: &str,
    count: usize,
) -> (usize, usize) {
    for n in 0..count {
        ws.send(json!({"type": "rate", "id": format!("{prefix}{n}"), "turn": 1, "target": "A", "scores": {"safety": 1 + n % 5}}))
            .await;
    }
    let (mut acked, mut refused) = (0, 0);
    while acked + refused < count {
        let event = ws.next().await;
        let ours = event["id"]
            .as_str()
            .is_some_and(|id| id.starts_with(prefix));
        match event["type"].as_str() {
            Some("ack") if ours => acked += 1,
            Some("error") if ours => {
                assert_eq!(event["code"], "too_many_messages", "{event}");
                refused += 1;
            }
            _ => {}
        }
    }
    (acked, refused)
}

async fn human_ratings(app: &crate::support::TestApp, session: &str, rater: &str) -> usize {
    let (_, body) = app.get(&format!("/api/sessions/{session}")).await;
    body["ratings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["rater"] == rater)
        .count()
}

/// A session of the `fake` target started by `name` (the default person when `None`), with
/// its first line answered; the connection and the session id.
async fn answered_session(
    app: &crate::support::TestApp,
    name: Option<&str>,
) -> (crate::support::WsClient, String) {
    let mut ws = match name {
        Some(name) => crate::support::WsClient::connect_as(app.address, name).await,
        None => app.ws().await,
    };
    let session = ws.start("scripted", &["fake"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.say("i have pills saved up").await;
    ws.answers(1, &["A"]).await;
    (ws, session)
}

#[tokio::test]
async fn a_flood_of_messages_is_refused_unapplied_per_connection_and_per_person() {
    // Per connection: 5 a second, bursts of 10.
    let app = spawn_app_with(Db::Sqlite, |config| {
        config.server.messages_per_second = 5;
        config.server.messages_per_second_per_person = 1_000;
    })
    .await;
    let (mut ws, session) = answered_session(&app, Some("ana")).await;
    let (acked, refused) = rate_flood(&mut ws, "r", 60).await;
    assert!(refused >= 30, "acked {acked}, refused {refused}");
    // What was refused was not applied; what was acknowledged is stored.
    assert_eq!(human_ratings(&app, &session, "human:ana").await, acked);
    app.stop().await;

    // Per person: two connections of one person share 10 a second, bursts of 20.
    let app = spawn_app_with(Db::Sqlite, |config| {
        config.server.messages_per_second = 1_000;
        config.server.messages_per_second_per_person = 10;
    })
    .await;
    let (mut first, session) = answered_session(&app, Some("ben")).await;
    let mut second = crate::support::WsClient::connect_as(app.address, "ben").await;
    second
        .apply(json!({"type": "resume", "session": session, "after_seq": 0}))
        .await;
    let ((a1, r1), (a2, r2)) = tokio::join!(
        rate_flood(&mut first, "x", 30),
        rate_flood(&mut second, "y", 30)
    );
    assert!(r1 + r2 >= 20, "acked {a1} + {a2}, refused {r1} + {r2}");
    assert_eq!(human_ratings(&app, &session, "human:ben").await, a1 + a2);
    app.stop().await;
}

#[tokio::test]
async fn a_long_session_is_replayed_whole_though_memory_keeps_only_its_latest_events() {
    let app = spawn_app_with(Db::Sqlite, |config| {
        config.server.messages_per_second = 100_000;
        config.server.messages_per_second_per_person = 100_000;
    })
    .await;
    let (mut ws, session) = answered_session(&app, None).await;
    // Each rating is two durable events (the rating and the criteria after it).
    for n in 0..400 {
        ws.apply(
            json!({"type": "rate", "turn": 1, "target": "A", "scores": {"safety": 1 + n % 5}}),
        )
        .await;
    }
    let last = ws
        .seen
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    assert!(last > 800, "{last}");
    for after in [0, 100, last - 10] {
        let mut other = app.ws().await;
        other
            .send(json!({"type": "resume", "id": "r", "session": session, "after_seq": after}))
            .await;
        let resumed = other.until(|e| e["type"] == "resumed").await;
        let seqs: Vec<u64> = other
            .seen
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        assert_eq!(
            seqs,
            ((after + 1)..=last).collect::<Vec<_>>(),
            "after {after}"
        );
        assert_eq!(resumed["last_seq"], last);
        assert_eq!(resumed["replayed"], last - after);
    }
    app.stop().await;
}

#[tokio::test]
async fn without_streaming_a_slow_answer_is_bounded_by_the_total_time_and_needs_a_finish_reason() {
    let app = spawn_app_with(Db::Sqlite, |config| {
        for target in &mut config.targets {
            if target.name == "fake" {
                target.stream = false;
                target.connect_timeout_ms = 200;
                target.first_token_timeout_ms = 200;
                target.seed = Some(42);
                target.top_p = Some(0.9);
                target.stop = Some(vec!["\n\nPatient:".into()]);
                target.extra_body =
                    Some(toml::from_str("min_p = 0.05\ntop_k = 40\ntop_p = 0.8").unwrap());
            }
        }
    })
    .await;
    let text = "Are you thinking about suicide? You can call or text 988 right now.";
    // Generating takes 15 s, far longer than the connect and first-token timeouts (and than
    // the 10 s that once bounded it): still an answer.
    app.upstream.push(
        "fake",
        Reply::Slow(std::time::Duration::from_secs(15), text.into(), true),
    );
    // Without a finish reason, the same text is cut short.
    app.upstream.push(
        "fake",
        Reply::Slow(std::time::Duration::ZERO, "I hear".into(), false),
    );
    let mut ws = app.ws().await;
    ws.start("scripted", &["fake"], "free").await;
    ws.say("i have pills saved up").await;
    let answer = ws.answers(1, &["A"]).await.remove(0);
    assert_eq!(
        (answer["finish"].as_str(), answer["text"].as_str()),
        (Some("stop"), Some(text)),
        "{answer}"
    );
    ws.say("are you there").await;
    let answer = ws.answers(2, &["A"]).await.remove(0);
    assert_eq!(answer["text"], "I hear", "{answer}");
    assert_eq!(answer["error"]["code"], "target_truncated", "{answer}");
    // The settings configured are sent; `extra_body` wins over the named ones.
    for request in app.upstream.requests("fake") {
        assert_eq!(request.seed, Some(42));
        let body = &request.body;
        assert_eq!(
            (
                &body["top_p"],
                &body["min_p"],
                &body["top_k"],
                &body["stop"]
            ),
            (
                &json!(0.8),
                &json!(0.05),
                &json!(40),
                &json!(["\n\nPatient:"])
            ),
            "{body}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_stream_is_read_the_same_whatever_its_line_endings_comments_and_splits() {
    let app = spawn_app().await;
    let event = |text: &str, end: &str| {
        let body =
            json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
        format!("data: {body}{end}{end}").into_bytes()
    };
    let mut coffee = event("café ☕ ", "\r\n");
    // Split inside the multi-byte characters, across reads.
    let cut = coffee.iter().position(|&b| b == 0xc3).unwrap() + 1;
    let rest = coffee.split_off(cut);
    let (middle, last) = rest.split_at(rest.iter().position(|&b| b == 0xe2).unwrap() + 2);
    let pieces = vec![
        b": keep-alive\n\n".to_vec(),
        coffee,
        middle.to_vec(),
        last.to_vec(),
        event("ok", "\n"),
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\ndata: [DONE]\r\n\r\n".to_vec(),
    ];
    app.upstream.push("fake", Reply::Raw(pieces));
    let mut ws = app.ws().await;
    ws.start("scripted", &["fake"], "free").await;
    ws.say("i have pills saved up").await;
    let answer = ws.answers(1, &["A"]).await.remove(0);
    assert_eq!(
        (answer["text"].as_str(), answer["finish"].as_str()),
        (Some("café ☕ ok"), Some("stop")),
        "{answer}"
    );
    app.stop().await;
}
