//! Vigil: role-play crisis conversations with AI models, every answer rated against the
//! scenario's safety criteria.
//!
//! Module map (dependencies point downwards only):
//!
//! ```text
//! http, ws, cli (main.rs)  ->  session (the engine)  ->  scenario, target, rating, store
//! ```
//!
//! - [`config`]: layered configuration (defaults, `vigil.toml`, `VIGIL_*`, flags), masked secrets.
//! - [`scenario`]: scenario files: raw TOML mirror, validation into types that cannot be wrong,
//!   diagnostics with `file:line:col`, crisis resources per locale, prompt templates.
//! - [`target`]: the models that answer: an OpenAI-compatible streaming client and the built-in
//!   canned `demo` target, behind one trait.
//! - [`rating`]: the rules engine (prefilters compiled once per criteria set and shared), criterion
//!   status over a session, pass/fail, score and headline.
//! - [`store`]: everything persistent (SQLite or PostgreSQL through sqlx `Any`), with a single
//!   group-committing writer.
//! - [`session`]: the engine: a pure state machine per session (its phase table, transitions,
//!   views, replay from rows) run by one actor per live session, driven by commands that carry
//!   their principal, publishing events.
//! - [`ws`]: the WebSocket protocol edge: frames to commands, events to frames (its own state).
//! - [`http`]: the axum router: JSON API, the web page, health.
//! - [`lint`]: the checks of `vigil lint` that need more than the files (stored versions),
//!   and the explanation of criteria against their examples.
//! - [`startup`]: builds the application from a config and binds its listener; [`serve`]
//!   serves its connections (header timeout, connection cap, graceful shutdown).
//! - [`tls`], [`time`], [`memory`]: small shared helpers (the rustls provider; stored
//!   timestamps; returning freed memory to the operating system).

pub mod config;
pub mod http;
pub mod lint;
pub mod memory;
pub mod rating;
pub mod scenario;
pub mod serve;
pub mod session;
pub mod startup;
pub mod store;
pub mod target;
pub mod time;
pub mod tls;
pub mod ws;
