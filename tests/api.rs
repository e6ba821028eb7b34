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
