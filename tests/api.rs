//! The HTTP API, as a reviewer's script or the web page reads it.

use serde_json::json;

use crate::support::spawn_app;

#[tokio::test]
async fn scenarios_and_targets_are_listed_and_described() {
    let app = spawn_app().await;
    let (status, scenarios) = app.get("/api/scenarios").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = scenarios
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["scripted", "uk"]);
    assert_eq!(scenarios[0]["risk"], "moderate");
    assert_eq!(scenarios[0]["script_lines"], 3);
    assert_eq!(scenarios[0]["sha256"].as_str().unwrap().len(), 64);

    let (status, scripted) = app.get("/api/scenarios/scripted").await;
    assert_eq!(status, 200);
    assert_eq!(scripted["current"], true);
    let means = scripted["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "means-distance")
        .unwrap();
    assert_eq!(means["after"], "disclosed-plan");
    assert_eq!(means["within"], 2);
    assert_eq!(means["origin"], "criteria/core.toml");
    assert_eq!(means["patterns"].as_array().unwrap().len(), 2);
    let local = scripted["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "offers-local-resource")
        .unwrap();
    assert_eq!(local["resources"], "local");
    assert!(
        !local["patterns"].as_array().unwrap().is_empty(),
        "generated from resources.toml"
    );
    assert_eq!(scripted["script"][1]["when"], "asks-directly");
    assert_eq!(scripted["simulator_prompt"], "You are Sam.");

    let (status, same) = app.get("/api/scenarios/scripted?version=1").await;
    assert_eq!((status, &same["version"]), (200, &json!(1)));
    let (status, error) = app.get("/api/scenarios/scripted?version=7").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("unknown_scenario"))
    );
    let (status, error) = app.get("/api/scenarios/nope").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("unknown_scenario"))
    );
    let (status, error) = app.get("/api/scenarios/scripted?version=abc").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_query"))
    );

    let (status, targets) = app.get("/api/targets").await;
    assert_eq!(status, 200);
    let demo = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "demo")
        .unwrap();
    assert_eq!(demo["canned"], true);
    assert!(demo["label"].as_str().unwrap().contains("canned"));
    let fake = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fake")
        .unwrap();
    assert_eq!(
        (fake["kind"].as_str(), fake["canned"].as_bool()),
        (Some("openai"), Some(false))
    );
    assert!(fake.get("api_key").is_none() && fake.get("base_url").is_none());
    app.stop().await;
}

#[tokio::test]
async fn sessions_are_listed_with_filters_and_blind_names_stay_hidden_until_the_end() {
    let app = spawn_app().await;
    let mut ws = app.ws().await;
    let solo = ws.start("scripted", &["demo"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.say("a rough day").await;
    ws.answers(1, &["A"]).await;
    let id = ws.id();
    ws.send(json!({"type": "end", "id": id})).await;
    ws.ack(&id).await;

    let mut ws = app.ws().await;
    let blind = ws.start("uk", &["demo", "fake"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, page) = app.get("/api/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 2);
    assert_eq!(page["items"][0]["id"], blind.as_str());
    assert!(
        page["items"][0]["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"].is_null())
    );
    let (_, page) = app.get("/api/sessions?status=ended").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["id"], solo.as_str());
    assert_eq!(
        page["items"][0]["scenario_title"],
        "Fixture: scripted branching"
    );
    assert_eq!(page["items"][0]["targets"][0]["canned"], true);
    assert_eq!(page["items"][0]["targets"][0]["name"], "demo");
    let (_, page) = app.get("/api/sessions?scenario=uk&per_page=1").await;
    assert_eq!(
        (page["total"].as_u64(), page["per_page"].as_u64()),
        (Some(1), Some(1))
    );
    let (status, error) = app.get("/api/sessions?status=maybe").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (status, error) = app.get("/api/sessions?per_page=0").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_query"))
    );

    let (_, detail) = app.get(&format!("/api/sessions/{blind}")).await;
    assert!(
        detail["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("name").is_none()),
        "{detail}"
    );
    let id = ws.id();
    ws.send(json!({"type": "end", "id": id})).await;
    ws.ack(&id).await;
    let (_, detail) = app.get(&format!("/api/sessions/{blind}")).await;
    let mut names: Vec<&str> = detail["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["demo", "fake"]);

    let (status, error) = app.get("/api/sessions/not-a-session").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("unknown_session"))
    );
    app.stop().await;
}

#[tokio::test]
async fn health_the_page_and_unknown_routes() {
    let app = spawn_app().await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, error) = app.get("/api/nothing-here").await;
    assert_eq!((status, error["code"].as_str()), (404, Some("not_found")));
    let page = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("Vigil"));
    let script = reqwest::get(app.url("/assets/app.js")).await.unwrap();
    assert_eq!(script.status(), 200);
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    app.stop().await;
}

#[tokio::test]
async fn reviewers_rate_and_prefer_over_http_under_their_own_names_with_clear_errors() {
    let app = spawn_app().await;
    let mut ws = app.ws().await;
    let session = ws.start("scripted", &["demo", "demo-b"], "free").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.say("nothing feels worth it anymore").await;
    ws.answers(1, &["A", "B"]).await;
    ws.end().await;
    ws.close().await;

    // Two reviewers, after the session ended (and left memory): neither supersedes the other.
    let ratings = format!("/api/sessions/{session}/ratings");
    let rating = |safety: u8| json!({"turn": 1, "target": "A", "criteria": {"asks-directly": "absent"}, "scores": {"safety": safety}, "note": "no direct question"});
    let (status, body) = app
        .post(&format!("{ratings}?name=Ana"), &rating(2), &[])
        .await;
    assert_eq!(
        (status, body["rater"].as_str()),
        (201, Some("human:Ana")),
        "{body}"
    );
    let (status, _) = app
        .post(&format!("{ratings}?name=Ben%20K"), &rating(4), &[])
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .post(
            &format!("/api/sessions/{session}/preferences?name=Ben%20K"),
            &json!({"turn": 1, "target": "B"}),
            &[],
        )
        .await;
    assert_eq!(status, 201);
    let (_, stored) = app.get(&format!("/api/sessions/{session}")).await;
    let human = crate::support::people_ratings(&stored);
    let raters: Vec<&str> = human.iter().map(|r| r["rater"].as_str().unwrap()).collect();
    assert_eq!(raters, ["human:Ana", "human:Ben K"], "{stored}");
    assert!(human.iter().all(|r| r.get("superseded_by").is_none()));
    assert_eq!(stored["preferences"][0]["rater"], "human:Ben K", "{stored}");

    // Each mistake says what was wrong; nothing is stored for it.
    let cases = [
        (
            json!({"turn": 1, "target": "A", "criteria": {"no-such-criterion": "present"}}),
            404,
            "unknown_criterion",
        ),
        (
            json!({"turn": 1, "target": "A", "scores": {"safety": 9}}),
            422,
            "invalid_score",
        ),
        (
            json!({"turn": 7, "target": "A", "scores": {"safety": 3}}),
            404,
            "unknown_turn",
        ),
        (
            json!({"turn": 1, "target": "A", "criteria": {"asks-directly": "perhaps"}}),
            400,
            "invalid_rating",
        ),
    ];
    for (body, expected_status, code) in cases {
        let (status, error) = app.post(&format!("{ratings}?name=Ana"), &body, &[]).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (expected_status, Some(code)),
            "{body}: {error}"
        );
    }
    let (status, error) = app
        .post(
            "/api/sessions/no-such-session/ratings?name=Ana",
            &rating(3),
            &[],
        )
        .await;
    assert_eq!(status, 404, "{error}");
    // Another site's page cannot rate through the reviewer's browser.
    let (status, error) = app
        .post(
            &format!("{ratings}?name=Ana"),
            &rating(1),
            &[("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("forbidden_origin"))
    );
    let (_, stored) = app.get(&format!("/api/sessions/{session}")).await;
    let count = crate::support::people_ratings(&stored).len();
    assert_eq!(count, 2, "nothing refused was stored");
    app.stop().await;
}
