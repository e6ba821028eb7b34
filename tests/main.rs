//! Vigil's integration tests: one binary, one module per area, all driving the real
//! application over real sockets (see `support`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod support;

mod api;
mod browser;
mod engine;
mod faults;
mod judge;
mod protocol;
mod restart;
mod scenarios;
mod storage;
mod targets;
