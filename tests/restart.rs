//! The real binary, killed with SIGKILL mid-answer and started again on the same database.

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{FakeUpstream, Gate, Reply, WsClient, fixture_scenarios};

/// Starts `vigil serve` and reads its log until it says where it listens.
async fn start_binary(config: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--config")
        .arg(config)
        .env("VIGIL_LOG", "vigil=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("vigil exited before listening");
    })
    .await
    .expect("vigil starts within 30 s");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, address)
}

#[tokio::test]
async fn after_sigkill_mid_answer_the_transcript_is_intact_and_the_session_resumes() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://{}\"\nscenarios = \"{}\"\n\n\
             [[targets]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"fake\"\nretries = 0\n",
            dir.path().join("vigil.db").display(),
            fixture_scenarios().display(),
            upstream.url
        ),
    )
    .unwrap();

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
    assert_eq!(
        answers[0]["text"],
        "I hear you. This is fake answering turn 3."
    );
    let request = upstream.requests("fake").pop().unwrap();
    let users: Vec<&str> = request
        .messages
        .iter()
        .filter(|(r, _)| r == "user")
        .map(|(_, c)| c.as_str())
        .collect();
    assert_eq!(users, ["first line", "second line", "third line"]);
    let id = ws.id();
    ws.send(json!({"type": "end", "id": id})).await;
    ws.next_of("ended").await;
    gate.open();
    child.kill().await.unwrap();
}
