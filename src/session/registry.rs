//! The registry of live sessions: starts them, finds them, brings them back from the database.
//!
//! A session lives in memory while someone watches it or an answer is streaming, and for an
//! idle period after; then its task ends and only the database holds it. Opening a session
//! that is not in memory (after that, or after a restart) rebuilds it from its rows, with the
//! exact scenario version it started with. One lock serialises starting and reopening, so two
//! clients resuming the same session at once get the same task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, Context, NewSession, Slot};
use super::{SessionError, SessionHandle, StartRequest};
use crate::rating::RuleSet;
use crate::scenario::{Library, Scenario, SourceBundle, load_bundle};
use crate::store::{NewSessionTarget, Store, StoreError, WriteOp};
use crate::target::{Target, Targets};
use crate::time::now_ms;

/// Commands queued for one session before senders wait.
const COMMAND_QUEUE: usize = 32;

#[derive(Debug, Clone)]
pub struct SessionsConfig {
    pub max_sessions: usize,
    pub max_targets: usize,
    pub max_text_chars: usize,
    pub idle: Duration,
    pub human_rater: String,
}

type LiveMap = Arc<Mutex<HashMap<String, (u64, SessionHandle)>>>;

struct Inner {
    store: Store,
    library: Arc<Library>,
    targets: Arc<Targets>,
    config: SessionsConfig,
    live: LiveMap,
    opening: tokio::sync::Mutex<()>,
    next_instance: AtomicU64,
    rules: Mutex<HashMap<String, Arc<RuleSet>>>,
    stored_scenarios: Mutex<HashMap<String, Arc<Scenario>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Every live session (cheap to clone).
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("live", &self.live_count())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain maps behind, still consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    pub fn new(
        store: Store,
        library: Arc<Library>,
        targets: Arc<Targets>,
        config: SessionsConfig,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                library,
                targets,
                config,
                live: Arc::new(Mutex::new(HashMap::new())),
                opening: tokio::sync::Mutex::new(()),
                next_instance: AtomicU64::new(1),
                rules: Mutex::new(HashMap::new()),
                stored_scenarios: Mutex::new(HashMap::new()),
                shutdown,
                tracker: TaskTracker::new(),
            }),
        }
    }

    pub fn library(&self) -> &Arc<Library> {
        &self.inner.library
    }

    pub fn targets(&self) -> &Arc<Targets> {
        &self.inner.targets
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &SessionsConfig {
        &self.inner.config
    }

    /// Sessions in memory now.
    pub fn live_count(&self) -> usize {
        lock(&self.inner.live).len()
    }

    /// Starts a session. A `start_id` already used opens that session instead.
    pub async fn start(&self, request: StartRequest) -> Result<SessionHandle, SessionError> {
        let inner = &self.inner;
        let _opening = inner.opening.lock().await;
        if let Some(start_id) = &request.start_id {
            let existing = inner
                .store
                .session_by_start_id(start_id)
                .await
                .map_err(|e| SessionError::storage(&e))?;
            if let Some(id) = existing {
                return self.open_locked(&id).await;
            }
        }
        let scenario = inner
            .library
            .get(&request.scenario)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = inner.library.scenarios.keys().map(String::as_str).collect();
                SessionError::new(
                    "unknown_scenario",
                    format!(
                        "there is no scenario `{}` (available: {})",
                        request.scenario,
                        known.join(", ")
                    ),
                )
            })?;
        if request.targets.is_empty() {
            return Err(SessionError::new(
                "no_targets",
                "choose at least one target",
            ));
        }
        if request.targets.len() > inner.config.max_targets {
            return Err(SessionError::new(
                "too_many_targets",
                format!("at most {} targets per session", inner.config.max_targets),
            ));
        }
        let mut chosen: Vec<&Target> = Vec::new();
        for name in &request.targets {
            let target = inner.targets.get(name).ok_or_else(|| {
                let known: Vec<&str> = inner.targets.names().collect();
                SessionError::new(
                    "unknown_target",
                    format!(
                        "there is no target `{name}` (available: {})",
                        known.join(", ")
                    ),
                )
            })?;
            if let Some(reason) = &target.info.unavailable {
                return Err(SessionError::new(
                    "target_unavailable",
                    format!("target `{name}`: {reason}"),
                ));
            }
            if chosen.iter().any(|t| t.info.name == *name) {
                return Err(SessionError::new(
                    "duplicate_target",
                    format!("target `{name}` is listed twice"),
                ));
            }
            chosen.push(target);
        }
        self.check_capacity()?;

        let blind = request.blind.unwrap_or(chosen.len() > 1);
        if blind {
            chosen.shuffle(&mut rand::rng());
        }
        let slots: Vec<Slot> = chosen
            .iter()
            .enumerate()
            .map(|(position, target)| {
                Slot::new(
                    alias(position),
                    target.info.name.clone(),
                    Some(target.info.clone()),
                    Some(Arc::clone(&target.model)),
                    system_prompt(&scenario, target.config.system_prompt.as_deref()),
                )
            })
            .collect();
        let session_targets: Vec<NewSessionTarget> = chosen
            .iter()
            .enumerate()
            .map(|(position, target)| NewSessionTarget {
                alias: alias(position),
                position: u32::try_from(position).unwrap_or(u32::MAX),
                target_name: target.info.name.clone(),
                target_config: serde_json::to_string(&target.config).unwrap_or_default(),
            })
            .collect();

        let id = uuid::Uuid::new_v4().to_string();
        let created_at = now_ms();
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (context, instance) = self.context(&id);
        let (actor, event_ops) = Actor::create(
            NewSession {
                id: id.clone(),
                scenario: Arc::clone(&scenario),
                rules: self.rules_for(&scenario),
                mode: request.mode,
                label: request.label.clone(),
                blind,
                slots,
                created_at,
            },
            context,
        );
        let mut ops = vec![
            WriteOp::ScenarioVersion {
                sha256: scenario.sha256().to_owned(),
                scenario_id: scenario.id.to_string(),
                version: scenario.version,
                title: scenario.title.clone(),
                bundle: scenario.bundle.to_json(),
                created_at,
            },
            WriteOp::CreateSession(crate::store::NewSession {
                id: id.clone(),
                scenario_id: scenario.id.to_string(),
                scenario_sha256: scenario.sha256().to_owned(),
                mode: request.mode.as_str().to_owned(),
                label: request.label,
                blind,
                start_id: request.start_id,
                created_at,
                targets: session_targets,
            }),
        ];
        ops.extend(event_ops);
        inner
            .store
            .write(ops)
            .await
            .map_err(|e| SessionError::storage(&e))?;
        tracing::info!(session = %id, scenario = %scenario.id, targets = chosen.len(), mode = request.mode.as_str(), "session started");
        Ok(self.spawn(id, actor, commands, receiver, instance))
    }

    /// The live session `id`, brought back from the database if it is not in memory.
    pub async fn open(&self, id: &str) -> Result<SessionHandle, SessionError> {
        if let Some((_, handle)) = lock(&self.inner.live).get(id) {
            return Ok(handle.clone());
        }
        let _opening = self.inner.opening.lock().await;
        self.open_locked(id).await
    }

    async fn open_locked(&self, id: &str) -> Result<SessionHandle, SessionError> {
        let inner = &self.inner;
        if let Some((_, handle)) = lock(&inner.live).get(id) {
            return Ok(handle.clone());
        }
        let record = match inner.store.load_session(id).await {
            Ok(record) => record,
            Err(StoreError::NotFound) => {
                return Err(SessionError::new(
                    "unknown_session",
                    format!("there is no session `{id}`"),
                ));
            }
            Err(err) => return Err(SessionError::storage(&err)),
        };
        self.check_capacity()?;
        let events = inner
            .store
            .session_events(id)
            .await
            .map_err(|e| SessionError::storage(&e))?;
        let applied = inner
            .store
            .applied_messages(id)
            .await
            .map_err(|e| SessionError::storage(&e))?;
        let scenario = self.stored_scenario(&record.session.scenario_sha256, &record.bundle)?;
        let slots = record
            .targets
            .iter()
            .map(|t| {
                let target = inner.targets.get(&t.target_name);
                let system = system_prompt(
                    &scenario,
                    target.and_then(|t| t.config.system_prompt.as_deref()),
                );
                Slot::new(
                    t.alias.clone(),
                    t.target_name.clone(),
                    target.map(|t| t.info.clone()),
                    target.map(|t| Arc::clone(&t.model)),
                    system,
                )
            })
            .collect();
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let (context, instance) = self.context(id);
        let rules = self.rules_for(&scenario);
        let actor = Actor::restore(&record, events, applied, scenario, rules, slots, context);
        tracing::info!(session = %id, "session reopened from the database");
        Ok(self.spawn(id.to_owned(), actor, commands, receiver, instance))
    }

    fn check_capacity(&self) -> Result<(), SessionError> {
        if self.live_count() >= self.inner.config.max_sessions {
            return Err(SessionError::new(
                "server_busy",
                format!(
                    "this server already holds {} live sessions, its limit; try again shortly",
                    self.inner.config.max_sessions
                ),
            ));
        }
        Ok(())
    }

    fn context(&self, id: &str) -> (Context, u64) {
        let instance = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let live = Arc::clone(&self.inner.live);
        let key = id.to_owned();
        let on_exit = Box::new(move || {
            let mut live = lock(&live);
            if live.get(&key).is_some_and(|(i, _)| *i == instance) {
                live.remove(&key);
            }
        });
        let config = &self.inner.config;
        let context = Context {
            store: self.inner.store.clone(),
            max_text_chars: config.max_text_chars,
            human_rater: config.human_rater.clone(),
            idle: config.idle,
            shutdown: self.inner.shutdown.child_token(),
            on_exit,
        };
        (context, instance)
    }

    fn spawn(
        &self,
        id: String,
        actor: Actor,
        commands: mpsc::Sender<super::Command>,
        receiver: mpsc::Receiver<super::Command>,
        instance: u64,
    ) -> SessionHandle {
        let handle = SessionHandle {
            id: Arc::from(id.as_str()),
            tx: commands,
        };
        lock(&self.inner.live).insert(id, (instance, handle.clone()));
        self.inner.tracker.spawn(actor.run(receiver));
        handle
    }

    /// The compiled rules of a scenario version, compiled once.
    fn rules_for(&self, scenario: &Arc<Scenario>) -> Arc<RuleSet> {
        let mut rules = lock(&self.inner.rules);
        Arc::clone(
            rules
                .entry(scenario.sha256().to_owned())
                .or_insert_with(|| Arc::new(RuleSet::new(Arc::clone(scenario)))),
        )
    }

    /// The scenario of a stored session: the loaded one if the files have not changed since,
    /// else rebuilt from the stored bundle (and kept).
    pub fn stored_scenario(
        &self,
        sha256: &str,
        bundle_json: &str,
    ) -> Result<Arc<Scenario>, SessionError> {
        if let Some(scenario) = self
            .inner
            .library
            .scenarios
            .values()
            .find(|s| s.sha256() == sha256)
        {
            return Ok(Arc::clone(scenario));
        }
        if let Some(scenario) = lock(&self.inner.stored_scenarios).get(sha256) {
            return Ok(Arc::clone(scenario));
        }
        let unreadable = |detail: String| {
            SessionError::new(
                "scenario_unreadable",
                format!("the scenario version this session ran with cannot be rebuilt: {detail}"),
            )
        };
        let bundle = SourceBundle::from_json(bundle_json).map_err(|e| unreadable(e.to_string()))?;
        let scenario =
            Arc::new(load_bundle(&bundle).map_err(|report| unreadable(report.to_string()))?);
        lock(&self.inner.stored_scenarios).insert(sha256.to_owned(), Arc::clone(&scenario));
        Ok(scenario)
    }

    /// Asks every session to finish (answers in progress are stopped and saved as
    /// interrupted) and waits for them, at most `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
    }
}

/// `A`, `B`, ... `Z`, `AA`, ...
fn alias(position: usize) -> String {
    let letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if position < letters.len() {
        (letters[position] as char).to_string()
    } else {
        format!(
            "{}{}",
            alias(position / letters.len() - 1),
            letters[position % letters.len()] as char
        )
    }
}

/// The system prompt a target sees: the target's own prompt (as its product would send it),
/// then the scenario's `[target]` context.
fn system_prompt(scenario: &Scenario, target_prompt: Option<&str>) -> Option<String> {
    match (target_prompt, scenario.target_prompt.as_deref()) {
        (Some(own), Some(context)) => Some(format!("{own}\n\n{context}")),
        (Some(own), None) => Some(own.to_owned()),
        (None, Some(context)) => Some(context.to_owned()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::alias;

    #[test]
    fn aliases_are_letters() {
        assert_eq!(alias(0), "A");
        assert_eq!(alias(1), "B");
        assert_eq!(alias(25), "Z");
        assert_eq!(alias(26), "AA");
    }
}
