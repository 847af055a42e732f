//! `muvee-agent check`: verifies this host can do its role. One line per check:
//! `ok`, `warn` or `error`, with a fix for anything not ok. Exit 1 on any error. The checks
//! themselves are `cp::health`'s, the same ones the agent sends as its health report.

use crate::agent::health::{self, Check, Status};
use crate::config::Config;
use crate::sys::executor::System;

pub fn run(cfg: &Config) -> u8 {
    let mut checks = health::host(cfg, &System);
    checks.extend(health::compose_policy(cfg));
    let (cp_check, cp) = health::control_plane(cfg);
    checks.push(cp_check);
    if let Some(cp) = cp {
        checks.extend(health::shares(cfg, &cp));
        checks.push(health::registry(&cp));
        checks.push(health::registry_login(cfg, &System, &cp));
    }
    for c in &checks {
        println!("{}", line(c));
    }
    u8::from(checks.iter().any(|c| c.status == Status::Error))
}

fn line(c: &Check) -> String {
    let fix = c.hint.as_deref().unwrap_or("");
    match c.status {
        Status::Ok => format!("ok    {}: {}", c.label, c.message),
        Status::Warning => format!("warn  {}: {}\n      fix: {fix}", c.label, c.message),
        Status::Error => format!("error {}: {}\n      fix: {fix}", c.label, c.message),
    }
}
