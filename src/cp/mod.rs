//! The protocol client: the HTTP client and its resolver, the control plane's wire records,
//! the durable journal and outbox of reports, and log shipping. It speaks the protocol and
//! keeps its promises (nothing lost, order per task) without knowing what a build is: tasks
//! and completions come from the task model (`crate::task`). `tls` is the TLS setup it shares
//! with the control channel.

pub mod client;
pub mod files;
pub mod journal;
pub mod latelog;
pub mod logbody;
pub mod logship;
pub mod outbox;
pub mod resolver;
pub mod tls;
pub mod url;
pub mod wire;
