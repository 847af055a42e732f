//! Integration tests for muvee-agent.

mod agent;
mod builder;
mod campaign;
mod compose;
mod control;
mod deployer;
mod dev_cp;
mod docs;
mod fake_cp;
mod fake_cp_selftest;
mod faults;
mod git_http;
mod logs;
mod operations;
mod packaging;
mod test_agent;
mod util;
