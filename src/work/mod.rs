//! The work a task does: dispatch by type, the builder and deploy roles (deploys, lifecycle
//! tasks, workspaces, reaping), the dataset and
//! git caches.

pub mod builder;
pub mod cleanups;
pub mod compose;
pub mod ctx;
pub mod datasets;
pub mod deployer;
pub mod dispatch;
pub mod error;
pub mod gitcache;
pub mod lifecycle;
pub mod policy;
pub mod reads;
pub mod reaper;
pub mod spec;
pub mod workspace;
pub mod yaml;
