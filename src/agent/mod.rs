//! The agent: the only layer that joins the protocol client (`cp`) and the task work
//! (`work`). The register/heartbeat/poll loop and its workers, two-stage shutdown, the
//! periodic reports (statuses, metrics, health, reaping) and the control channel's sessions.

pub mod control;
pub mod frame;
pub mod health;
pub mod metrics;
pub mod reports;
pub mod run;
pub mod session;
