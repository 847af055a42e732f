//! packaging/: the systemd unit passes `systemd-analyze verify`, the env file example lists every
//! variable the agent reads, `make install-data` honours DESTDIR and PREFIX, and the compose
//! recipe gives each agent its own DATA_DIR, mounted at the same path on both sides.

use crate::util;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A missing tool skips loudly, or fails under MUVEE_REQUIRE_DOCKER=1 (CI installs it).
fn require_tool(tool: &str, package: &str) -> bool {
    if have(tool) {
        return true;
    }
    let msg = format!("{tool} not found (Debian package {package})");
    assert!(
        std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "{msg} and MUVEE_REQUIRE_DOCKER=1"
    );
    eprintln!("\n!!! packaging check SKIPPED: {msg}\n");
    false
}

fn unit_settings() -> Vec<(String, String)> {
    read("packaging/muvee-agent.service")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn setting(key: &str) -> String {
    let found: Vec<String> = unit_settings()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{key}: {found:?}");
    found[0].clone()
}

#[test]
fn the_unit_file_has_the_promised_settings() {
    assert_eq!(setting("Type"), "simple");
    assert_eq!(setting("Restart"), "on-failure");
    assert_eq!(setting("KillMode"), "mixed");
    assert_eq!(setting("EnvironmentFile"), "/etc/muvee/agent.env");
    assert_eq!(setting("NoNewPrivileges"), "yes");
    assert_eq!(setting("ProtectSystem"), "full");
    assert_eq!(setting("PrivateTmp"), "yes");
    // DATA_DIR's state (reports with task results) is private to the agent's user.
    assert_eq!(setting("UMask"), "0077");
    let stop: u64 = setting("TimeoutStopSec").parse().unwrap();
    assert!(
        stop > 300,
        "TimeoutStopSec {stop} must exceed SHUTDOWN_GRACE's 5m"
    );
    // Options that would cut the agent off the docker socket or its children.
    for bad in [
        "PrivateNetwork",
        "RestrictAddressFamilies",
        "DynamicUser",
        "PrivateDevices",
        "ProtectHome",
    ] {
        assert!(!unit_settings().iter().any(|(k, _)| k == bad), "{bad}");
    }
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = util::temp_dir("unit-verify");
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = read("packaging/muvee-agent.service").replace(
        "ExecStart=/usr/local/bin/muvee-agent",
        &format!("ExecStart={}", util::bin().display()),
    );
    let path = dir.join("muvee-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    // verify exits 0 on settings it ignores; any message is a finding.
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

/// Every variable config.rs reads (a quoted upper-case name) and the log filters.
fn variables_the_agent_reads() -> Vec<String> {
    let src = read("src/config.rs");
    let mut vars: Vec<String> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.len() > 3 && w.contains('_') && w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
        .map(String::from)
        .collect();
    vars.extend(["RUST_LOG".into(), "MUVEE_LOG".into()]);
    vars.sort();
    vars.dedup();
    vars
}

#[test]
fn the_env_file_example_lists_every_variable() {
    let example = read("packaging/agent.env.example");
    let vars = variables_the_agent_reads();
    assert!(vars.len() > 18, "{vars:?}");
    let keys: Vec<&str> = example
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    for v in &vars {
        assert!(keys.contains(&v.as_str()), "agent.env.example lacks {v}");
    }
    // What systemd and compose read: KEY=value lines or comments, no quotes, no export.
    for l in example
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{l}"));
        assert!(
            vars.contains(&k.to_string()),
            "{k} is not read by the agent"
        );
        assert!(!v.contains('"') && !v.contains('\''), "{l}");
    }
}

#[test]
fn make_install_data_honours_destdir_and_prefix() {
    if !require_tool("make", "make") {
        return;
    }
    let dest = util::temp_dir("install");
    let out = Command::new("make")
        .current_dir(root())
        .arg("-s")
        .arg("install-data")
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("PREFIX=/opt/muvee")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", util::describe(&out));
    let p = |rel: &str| -> PathBuf { dest.join("opt/muvee").join(rel) };
    let unit = std::fs::read_to_string(p("lib/systemd/system/muvee-agent.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/opt/muvee/bin/muvee-agent\n"),
        "{unit}"
    );
    for rel in [
        "share/man/man1/muvee-agent.1",
        "share/muvee-agent/agent.env.example",
        "share/muvee-agent/docker-compose.agent.yml",
    ] {
        assert!(p(rel).is_file(), "{rel} not installed");
    }
}

#[test]
fn the_compose_recipe_mounts_data_dir_at_the_same_path() {
    let yml = read("packaging/docker-compose.agent.yml");
    for role in ["NODE_ROLE: builder", "NODE_ROLE: deploy"] {
        assert!(yml.contains(role), "{role}");
    }
    let mounts: Vec<&str> = yml
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert!(mounts.contains(&"/var/run/docker.sock:/var/run/docker.sock"));
    // Each agent its own DATA_DIR (two on one refuse to start), mounted at that path.
    let data_dirs: Vec<&str> = yml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("DATA_DIR: "))
        .collect();
    assert_eq!(data_dirs.len(), 2, "{data_dirs:?}");
    assert_ne!(data_dirs[0], data_dirs[1], "the services share a DATA_DIR");
    for d in &data_dirs {
        assert!(
            mounts.contains(&format!("{d}:{d}").as_str()),
            "{d} not mounted"
        );
    }
    for m in &mounts {
        let mut parts = m.split(':');
        let (host, ctr) = (parts.next().unwrap(), parts.next().unwrap());
        assert_eq!(host, ctr, "{m}: host and container paths must match");
    }
    if !have("docker-compose") {
        eprintln!("docker-compose not found: the recipe's syntax is not checked");
        return;
    }
    let dir = util::temp_dir("compose");
    let env = root().join("packaging/agent.env.example");
    let path = dir.join("compose.yml");
    std::fs::write(
        &path,
        yml.replace("/etc/muvee/agent.env", &env.display().to_string()),
    )
    .unwrap();
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&path)
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", util::describe(&out));
}
