//! The registry of live sessions: starts them, finds them, brings them back from the database.
//!
//! A session lives in memory while someone watches it or an answer is streaming, and for an
//! idle period after (a few seconds once it has ended); then its task ends and only the
//! database holds it. Opening a session that is not in memory (after that, or after a restart)
//! rebuilds it from its rows ([`super::replay`]), with the exact scenario version it started
//! with. A lock per session id (and per `start` id) makes two clients resuming the same session
//! at once get the same task, while different sessions start and reopen in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, Context, Message};
use super::event::Published;
use super::state::{NewSession, SessionState, SessionTarget};
use super::{SessionError, SessionHandle, StartRequest, replay};
use crate::rating::RuleSet;
use crate::scenario::{Library, Scenario, SourceBundle, load_bundle};
use crate::store::{NewSessionTarget, SessionRecord, Store, StoreError, WriteOp};
use crate::target::{ChatModel, Target, Targets};
use crate::time::now_ms;

/// How often freed memory is handed back after sessions left it ([`crate::memory`]).
const TRIM_PERIOD: Duration = Duration::from_secs(2);

/// Commands queued for one session before senders wait.
const COMMAND_QUEUE: usize = 32;

#[derive(Debug, Clone)]
pub struct SessionsConfig {
    pub max_sessions: usize,
    pub max_sessions_per_person: usize,
    pub max_targets: usize,
    pub max_text_chars: usize,
    pub idle: Duration,
    /// How long an ended session nobody watches stays in memory.
    pub ended_idle: Duration,
    /// The principal of WebSocket clients that give no name.
    pub human_rater: String,
    /// Rates every answer after the rules, when configured.
    pub judge: Option<Arc<crate::rating::judge::Judge>>,
}

/// Live sessions by id: the task's instance, its handle, and who started it in this process.
type LiveMap = Arc<Mutex<HashMap<String, Live>>>;

struct Live {
    instance: u64,
    handle: SessionHandle,
    owner: Option<String>,
}

struct Inner {
    store: Store,
    library: Arc<Library>,
    targets: Arc<Targets>,
    config: SessionsConfig,
    live: LiveMap,
    opening: KeyedLock,
    next_instance: AtomicU64,
    rules: Mutex<HashMap<String, Arc<RuleSet>>>,
    stored_scenarios: Mutex<HashMap<String, Arc<Scenario>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    trimmer: crate::memory::Trimmer,
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
        let trimmer = crate::memory::Trimmer::default();
        trimmer.spawn(TRIM_PERIOD, shutdown.clone());
        Self {
            inner: Arc::new(Inner {
                store,
                library,
                targets,
                config,
                live: Arc::new(Mutex::new(HashMap::new())),
                opening: KeyedLock::default(),
                next_instance: AtomicU64::new(1),
                rules: Mutex::new(HashMap::new()),
                stored_scenarios: Mutex::new(HashMap::new()),
                shutdown,
                tracker: TaskTracker::new(),
                trimmer,
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
        let _starting = match &request.start_id {
            Some(start_id) => Some(inner.opening.lock(&format!("start:{start_id}")).await),
            None => None,
        };
        if let Some(start_id) = &request.start_id {
            let existing = inner
                .store
                .session_by_start_id(start_id)
                .await
                .map_err(|e| SessionError::storage(&e))?;
            if let Some(id) = existing {
                return self.open(&id).await;
            }
        }
        let scenario = inner
            .library
            .get(&request.scenario)
            .cloned()
            .ok_or_else(|| SessionError::UnknownScenario {
                id: request.scenario.clone(),
                available: inner
                    .library
                    .scenarios
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if request.targets.is_empty() {
            return Err(SessionError::NoTargets);
        }
        if request.targets.len() > inner.config.max_targets {
            return Err(SessionError::TooManyTargets {
                max: inner.config.max_targets,
            });
        }
        let mut chosen: Vec<&Target> = Vec::new();
        for name in &request.targets {
            let target = inner
                .targets
                .get(name)
                .ok_or_else(|| SessionError::UnknownTarget {
                    name: name.clone(),
                    available: inner.targets.names().collect::<Vec<_>>().join(", "),
                })?;
            if let Some(reason) = &target.info.unavailable {
                return Err(SessionError::TargetUnavailable(format!(
                    "target `{name}`: {reason}"
                )));
            }
            if chosen.iter().any(|t| t.info.name == *name) {
                return Err(SessionError::DuplicateTarget { name: name.clone() });
            }
            chosen.push(target);
        }
        self.check_capacity()?;
        let owner = request.owner.as_ref().map(ToString::to_string);
        if let Some(owner) = &owner {
            let held = lock(&inner.live)
                .values()
                .filter(|l| l.owner.as_ref() == Some(owner))
                .count();
            if held >= inner.config.max_sessions_per_person {
                return Err(SessionError::TooManySessions {
                    max: inner.config.max_sessions_per_person,
                });
            }
        }

        let blind = request.blind.unwrap_or(chosen.len() > 1);
        if blind {
            chosen.shuffle(&mut rand::rng());
        }
        let targets: Vec<SessionTarget> = chosen
            .iter()
            .enumerate()
            .map(|(position, target)| replay::new_target(alias(position), target, &scenario))
            .collect();
        let models: Vec<Option<(Arc<dyn ChatModel>, usize)>> = chosen
            .iter()
            .map(|t| Some((Arc::clone(&t.model), t.config.max_answer_chars)))
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
        let mut state = SessionState::new(NewSession {
            id: id.clone(),
            scenario: Arc::clone(&scenario),
            rules: self.rules_for(&scenario),
            mode: request.mode,
            label: request.label.clone(),
            blind,
            targets,
            created_at,
            max_text_chars: inner.config.max_text_chars,
        });
        let first = state.start();
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
                names_revealed: state.names_revealed(),
                start_id: request.start_id,
                created_at,
                targets: session_targets,
            }),
        ];
        ops.extend(first.ops);
        // The session row and its first events in one commit, before anyone is told it exists.
        inner
            .store
            .write(ops)
            .await
            .map_err(|e| SessionError::storage(&e))?;
        tracing::info!(session = %id, scenario = %scenario.id, targets = chosen.len(), mode = request.mode.as_str(), "session started");
        Ok(self.spawn(state, models, first.events, None, owner))
    }

    /// The live session `id`, brought back from the database if it is not in memory.
    pub async fn open(&self, id: &str) -> Result<SessionHandle, SessionError> {
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.handle.clone());
        }
        let _opening = self.inner.opening.lock(&format!("session:{id}")).await;
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.handle.clone());
        }
        let record = self.load(id).await?;
        self.check_capacity()?;
        let inner = &self.inner;
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
        let next_seq = events.last().map_or(1, |(seq, _)| seq + 1);
        let mut state = self.rebuild(&record, applied, next_seq)?;
        let pending = replay::unfinished_regenerations(&record, &events);
        let first = state.record_interrupted(now_ms(), &pending);
        let models = record
            .targets
            .iter()
            .map(|t| {
                inner
                    .targets
                    .get(&t.target_name)
                    .map(|t| (Arc::clone(&t.model), t.config.max_answer_chars))
            })
            .collect();
        let log = events
            .into_iter()
            .map(|(seq, json)| Arc::new(Published::stored(seq, json)))
            .collect();
        tracing::info!(session = %id, "session reopened from the database");
        Ok(self.spawn(state, models, log, first, None))
    }

    /// A stored session, as its rows say.
    async fn load(&self, id: &str) -> Result<SessionRecord, SessionError> {
        match self.inner.store.load_session(id).await {
            Ok(record) => Ok(record),
            Err(StoreError::NotFound) => Err(SessionError::UnknownSession { id: id.to_owned() }),
            Err(err) => Err(SessionError::storage(&err)),
        }
    }

    /// A stored session's state rebuilt from its rows, for the read API (the same function
    /// that brings a session back to life).
    pub async fn stored(&self, id: &str) -> Result<(SessionRecord, SessionState), SessionError> {
        let record = self.load(id).await?;
        let state = self.rebuild(&record, Vec::new(), 1)?;
        Ok((record, state))
    }

    /// The state of a stored session, with the scenario version and rules it ran with.
    fn rebuild(
        &self,
        record: &SessionRecord,
        applied: Vec<String>,
        next_seq: u64,
    ) -> Result<SessionState, SessionError> {
        let scenario = self.stored_scenario(&record.session.scenario_sha256, &record.bundle)?;
        Ok(replay::rebuild(
            record,
            Arc::clone(&scenario),
            self.rules_for(&scenario),
            &self.inner.targets,
            self.inner.config.max_text_chars,
            applied,
            next_seq,
        ))
    }

    fn check_capacity(&self) -> Result<(), SessionError> {
        if self.live_count() >= self.inner.config.max_sessions {
            return Err(SessionError::ServerBusy {
                max: self.inner.config.max_sessions,
            });
        }
        Ok(())
    }

    /// Starts the task of a session and lists it as live.
    fn spawn(
        &self,
        state: SessionState,
        models: Vec<Option<(Arc<dyn ChatModel>, usize)>>,
        log: Vec<Arc<Published>>,
        first: Option<super::state::Batch>,
        owner: Option<String>,
    ) -> SessionHandle {
        let id = state.id().to_owned();
        let instance = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let live = Arc::clone(&self.inner.live);
        let key = id.clone();
        let trimmer = self.inner.trimmer.clone();
        let on_exit = Box::new(move || {
            let mut live = lock(&live);
            if live.get(&key).is_some_and(|l| l.instance == instance) {
                live.remove(&key);
            }
            trimmer.released();
        });
        let config = &self.inner.config;
        let context = Context {
            store: self.inner.store.clone(),
            idle: config.idle,
            ended_idle: config.ended_idle,
            shutdown: self.inner.shutdown.child_token(),
            on_exit,
            judge: config.judge.clone(),
        };
        let mut state = state;
        state.set_judge(config.judge.as_ref().map(|j| j.rater.clone()));
        let (mailbox_tx, mailbox) = mpsc::channel::<Message>(COMMAND_QUEUE);
        let (actor, finished, judged) = Actor::new(state, models, log, first, context);
        let handle = SessionHandle {
            id: Arc::from(id.as_str()),
            tx: mailbox_tx,
        };
        lock(&self.inner.live).insert(
            id,
            Live {
                instance,
                handle: handle.clone(),
                owner,
            },
        );
        self.inner
            .tracker
            .spawn(actor.run(mailbox, finished, judged));
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
        let unreadable = |detail: String| SessionError::ScenarioUnreadable { detail };
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

/// One async lock per key (a session id, a `start` id), so unrelated sessions never wait for
/// each other. A key's entry is dropped when its last holder lets go.
#[derive(Default)]
struct KeyedLock {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyedGuard<'a> {
    owner: &'a KeyedLock,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLock {
    async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let mutex = Arc::clone(
            lock(&self.locks)
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))),
        );
        let guard = mutex.lock_owned().await;
        KeyedGuard {
            owner: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = lock(&self.owner.locks);
        // Held by the map alone: nobody waits for it any more.
        if locks
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{KeyedLock, alias};
    use futures_util::FutureExt;

    #[tokio::test]
    async fn a_key_locks_only_itself() {
        let locks = KeyedLock::default();
        let a = locks.lock("session:a").await;
        assert!(
            locks.lock("session:b").now_or_never().is_some(),
            "another session opens while `a` is being opened"
        );
        assert!(locks.lock("session:a").now_or_never().is_none());
        drop(a);
        assert!(locks.lock("session:a").now_or_never().is_some());
        assert!(super::lock(&locks.locks).is_empty(), "entries are dropped");
    }

    #[test]
    fn aliases_are_letters() {
        assert_eq!(alias(0), "A");
        assert_eq!(alias(1), "B");
        assert_eq!(alias(25), "Z");
        assert_eq!(alias(26), "AA");
    }
}
