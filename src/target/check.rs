//! `vigil targets check`: before a clinician sits down, ask each target's server what it
//! serves and send it one tiny request with the target's own settings, and say what works
//! (the model name, the key, streaming, token counts, reasoning) in words. `serve` runs the
//! cheap half (the model list) at start and only warns.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::time::Instant;

use super::{ChatMessage, Chunk, Role, Target, TargetError};
use crate::config::TargetKind;

/// Where a target's server lists its models, asked with the target's own client and headers.
#[derive(Debug, Clone)]
pub struct Probe {
    pub(super) endpoint: Arc<super::http::Endpoint>,
    pub(super) models: reqwest::Url,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Note,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

/// What was found about one target.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    /// Kind, model and where (the URL without its query, which may carry a key).
    pub heading: String,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    fn push(&mut self, level: Level, text: impl Into<String>) {
        self.findings.push(Finding {
            level,
            text: text.into(),
        });
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} ({})", self.name, self.heading)?;
        for finding in &self.findings {
            let mark = match finding.level {
                Level::Ok => "ok  ",
                Level::Note => "    ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            writeln!(f, "  {mark} {}", finding.text)?;
        }
        Ok(())
    }
}

/// Checks one target: its key, its server's model list, and (with `request`) one tiny answer.
pub async fn check(target: &Target, request: bool) -> Report {
    let info = &target.info;
    let mut report = Report {
        name: info.name.clone(),
        heading: heading(target),
        findings: Vec::new(),
    };
    if info.kind == TargetKind::Demo {
        report.push(Level::Ok, "canned answers built in: nothing to reach");
        return report;
    }
    if let Some(why) = &info.unavailable {
        report.push(Level::Fail, why.clone());
        return report;
    }
    let model = info.model.clone().unwrap_or_default();
    if let Some(probe) = &target.probe {
        models(probe, &model, &mut report).await;
    }
    if request {
        answer(target, &mut report).await;
    }
    report
}

fn heading(target: &Target) -> String {
    let kind = target.info.kind.as_str();
    match (&target.info.model, &target.config.base_url) {
        (Some(model), Some(base)) => {
            let shown = reqwest::Url::parse(base)
                .map(|url| super::http::without_query(&url))
                .unwrap_or_else(|_| base.clone());
            format!("{kind}, model `{model}` at {shown}")
        }
        (Some(model), None) => format!("{kind}, model `{model}`"),
        _ => kind.to_owned(),
    }
}

#[derive(Deserialize)]
struct ModelList {
    #[serde(default)]
    data: Vec<ModelEntry>,
    /// Ollama's own `/api/tags` shape, which some proxies pass on.
    #[serde(default)]
    models: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    #[serde(alias = "name")]
    id: String,
}

async fn models(probe: &Probe, model: &str, report: &mut Report) {
    let endpoint = &probe.endpoint;
    let sent = endpoint
        .client
        .get(probe.models.clone())
        .headers(endpoint.headers.clone())
        .timeout(endpoint.timeouts.connect.max(Duration::from_secs(5)))
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(err) => {
            report.push(
                Level::Fail,
                format!(
                    "cannot reach the server: {}",
                    super::http::without_url(&err)
                ),
            );
            return;
        }
    };
    let status = response.status();
    if matches!(status.as_u16(), 401 | 403) {
        report.push(
            Level::Fail,
            format!("the server refused the key (HTTP {status}) when asked for its models"),
        );
        return;
    }
    if !status.is_success() {
        report.push(
            Level::Note,
            format!("the server does not list its models (HTTP {status}); the model name is checked by the request"),
        );
        return;
    }
    let list: ModelList = match response.json().await {
        Ok(list) => list,
        Err(_) => {
            report.push(
                Level::Note,
                "the server's model list is not in a shape Vigil reads",
            );
            return;
        }
    };
    let ids: Vec<String> = list
        .data
        .into_iter()
        .chain(list.models)
        .map(|m| m.id)
        .collect();
    if ids.iter().any(|id| id == model) {
        report.push(
            Level::Ok,
            format!("the server lists `{model}`{}", plural_of(ids.len())),
        );
    } else {
        let shown: Vec<&str> = ids.iter().take(8).map(String::as_str).collect();
        let more = if ids.len() > shown.len() { ", ..." } else { "" };
        report.push(
            Level::Warn,
            format!(
                "the server does not list `{model}`; it lists {}{}: {}{more} (some servers answer under any name)",
                ids.len(),
                if ids.len() == 1 { " model" } else { " models" },
                shown.join(", ")
            ),
        );
    }
}

async fn answer(target: &Target, report: &mut Report) {
    let messages = vec![ChatMessage::new(
        Role::User,
        "This is a connection check. Reply with the single word: ready",
    )];
    let started = Instant::now();
    let mut stream = target.model.stream(messages);
    let (mut text, mut reasoning) = (String::new(), 0usize);
    let mut sent = started;
    let mut first = None;
    let end = loop {
        match stream.next().await {
            Some(Ok(Chunk::Sent { .. })) => sent = Instant::now(),
            Some(Ok(Chunk::Text(t) | Chunk::Refusal(t))) => {
                first.get_or_insert_with(|| sent.elapsed());
                text.push_str(&t);
            }
            Some(Ok(Chunk::Reasoning(r))) => reasoning += r.chars().count(),
            Some(Ok(Chunk::Done { finish, usage })) => break Ok((finish, usage)),
            Some(Err(err)) => break Err(err),
            None => break Err(TargetError::Truncated("the answer ended early".to_owned())),
        }
    };
    let took = sent.elapsed();
    let mode = if target.config.stream {
        "streaming"
    } else {
        "not streaming"
    };
    match end {
        Ok((finish, usage)) => {
            let first = first
                .map(|d| format!(", first token after {} ms", d.as_millis()))
                .unwrap_or_default();
            report.push(
                Level::Ok,
                format!(
                    "answered in {} ms{first} ({mode}), finish `{finish}`: the settings were accepted",
                    took.as_millis()
                ),
            );
            match (usage.prompt, usage.completion) {
                (None, None) => report.push(
                    Level::Note,
                    "no token counts reported (answers are stored without them)",
                ),
                (prompt, completion) => report.push(
                    Level::Ok,
                    format!(
                        "token counts reported: {} prompt, {} completion",
                        count(prompt),
                        count(completion)
                    ),
                ),
            }
        }
        Err(err) => {
            let level = match err {
                TargetError::Truncated(_) | TargetError::Empty(_) => Level::Warn,
                _ => Level::Fail,
            };
            report.push(level, format!("{} [{}]", err, err.code()));
        }
    }
    if reasoning > 0 {
        report.push(
            Level::Ok,
            format!("reasoning seen ({reasoning} characters), kept apart from the answer"),
        );
    }
    if !text.is_empty() {
        let preview: String = text.chars().take(80).collect();
        let more = if text.chars().count() > 80 { "..." } else { "" };
        report.push(Level::Note, format!("it said: {preview:?}{more}"));
    }
}

/// ` (of its 3 models)`, or nothing when it is the only one.
fn plural_of(n: usize) -> String {
    if n > 1 {
        format!(" (of its {n} models)")
    } else {
        String::new()
    }
}

fn count(tokens: Option<u32>) -> String {
    tokens.map_or_else(|| "?".to_owned(), |t| t.to_string())
}
