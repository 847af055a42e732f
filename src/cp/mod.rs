//! Talking to the control plane: the HTTP client and wire types, the agent loop, the
//! durable journal and outbox, log shipping, node/container metrics, the host checks behind
//! `check` and the health report, and the deploy role's periodic reports.

pub mod agent;
pub mod client;
pub mod health;
pub mod journal;
pub mod logship;
pub mod metrics;
pub mod outbox;
pub mod reports;
pub mod resolver;
pub mod wire;
