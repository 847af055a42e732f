//! The host: running external programs, signals, secret redaction.

pub mod bell;
pub mod disk;
pub mod docker;
pub mod executor;
#[cfg(test)]
pub mod fake;
pub mod git;
pub mod redact;
pub mod rsync;
pub mod signal;
pub mod sync;
pub mod tree;
