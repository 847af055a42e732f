//! Talking to the control plane: the HTTP client and wire types, the agent loop, the
//! durable journal and outbox, log shipping, and node/container metrics.

pub mod agent;
pub mod client;
pub mod journal;
pub mod logship;
pub mod metrics;
pub mod outbox;
pub mod resolver;
pub mod wire;
