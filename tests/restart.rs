//! The real binary, killed with SIGKILL mid-answer and started again on the same database.

use std::net::SocketAddr;

use serde_json::json;
use tokio::process::{Child, Command};

use crate::support::binary::start_vigil;
use crate::support::{FakeUpstream, Gate, Reply, WsClient, binary_config};

async fn start_binary(config: &std::path::Path) -> (Child, SocketAddr) {
    start_vigil(Command::new(env!("CARGO_BIN_EXE_vigil")), config, &[]).await
}

#[tokio::test]
async fn after_sigkill_mid_answer_the_transcript_is_intact_and_the_session_resumes() {
    // This test's own HTTP client needs it, whichever test of the binary runs first.
    vigil::tls::install_provider();
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(dir.path(), &upstream.url, "");

    let (mut child, address) = start_binary(&config).await;
    let mut ws = WsClient::connect(address).await;
    let started = ws.start("scripted", &["fake"], "free").await;
    let session = started["session"].as_str().unwrap().to_owned();
    ws.say("first line").await;
    ws.answers(1, &["A"]).await;
    let gate = Gate::new();
    upstream.push(
        "fake",
        Reply::Gated(vec!["Half an ".into()], gate.clone(), vec!["answer".into()]),
    );
    ws.say("second line").await;
    ws.next_of("delta").await;
    let last_seq = ws.last_seq();

    child.kill().await.unwrap(); // SIGKILL: no shutdown, no flush
    drop(ws);

    let (mut child, address) = start_binary(&config).await;
    let response = reqwest::get(format!("http://{address}/api/sessions/{session}"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stored: serde_json::Value = response.json().await.unwrap();
    let turns = stored["turns"].as_array().unwrap();
    assert_eq!(
        turns.len(),
        2,
        "both patient lines were saved before the kill: {stored}"
    );
    assert_eq!(
        turns[0]["answers"][0]["text"],
        "I hear you. This is fake answering turn 1."
    );
    assert_eq!(turns[1]["text"], "second line");

    let mut ws = WsClient::connect(address).await;
    ws.send(json!({"type": "resume", "session": session, "after_seq": last_seq}))
        .await;
    let interrupted = ws.until(|e| e["type"] == "answer" && e["turn"] == 2).await;
    assert_eq!(interrupted["finish"], "interrupted");
    let error = ws.next_of("error").await;
    assert_eq!(error["code"], "answer_interrupted");
    ws.next_of("resumed").await;

    // The session goes on where it was, and can be ended.
    ws.say("third line").await;
    let answers = ws.answers(3, &["A"]).await;
    // (The fake counts the user messages it got: two, see below.)
    assert_eq!(
        answers[0]["text"],
        "I hear you. This is fake answering turn 2."
    );
    let request = upstream.requests("fake").pop().unwrap();
    let users: Vec<&str> = request
        .messages
        .iter()
        .filter(|(r, _)| r == "user")
        .map(|(_, c)| c.as_str())
        .collect();
    // The interrupted answer had no text saved: its line goes with the next one, so that
    // the roles still alternate.
    assert_eq!(users, ["first line", "second line\n\nthird line"]);
    let id = ws.id();
    ws.send(json!({"type": "end", "id": id})).await;
    ws.next_of("ended").await;
    gate.open();
    child.kill().await.unwrap();
}
