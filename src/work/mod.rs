//! The work a task does: dispatch by type, the builder and deploy roles, the dataset cache.

pub mod builder;
pub mod ctx;
pub mod datasets;
pub mod deployer;
pub mod dispatch;
pub mod error;
pub mod lifecycle;
