//! Integration tests for muvee-agent.

mod agent;
mod fake_cp;
mod fake_cp_selftest;
mod util;
mod docs;
