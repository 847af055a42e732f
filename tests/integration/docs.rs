//! The man page and README cover every flag and environment variable `--help` shows.

use crate::util;
use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(util::bin()).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(rel: &str) -> String {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap();
    text.replace("\\-", "-").replace("\\e", "\\")
}

#[test]
fn man_page_and_readme_cover_every_flag_and_variable() {
    let man = read("man/muvee-agent.1");
    let readme = read("README.md");
    let text = help(&["--help"]) + &help(&["run-task", "--help"]);
    let flags: Vec<&str> = text
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', ']']))
        .collect();
    assert!(flags.len() > 20, "{text}");
    for f in &flags {
        assert!(man.contains(f), "man page lacks {f}");
    }
    let vars: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|w| w.len() > 4 && w.contains('_'))
        .collect();
    assert!(
        vars.contains(&"NODE_ROLE") && vars.contains(&"DEPLOY_DRAIN"),
        "{vars:?}"
    );
    for v in &vars {
        assert!(man.contains(v), "man page lacks {v}");
        assert!(readme.contains(v), "README lacks {v}");
    }
    for sub in ["run-task", "check"] {
        assert!(
            man.contains(sub) && readme.contains(sub),
            "{sub} undocumented"
        );
    }
}

#[test]
fn version_flag_prints_the_version() {
    assert_eq!(
        help(&["--version"]),
        format!("muvee-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `RUST_LOG` works as Rust tools read it; `MUVEE_LOG` is an alias that wins when both are set.
#[test]
fn rust_log_sets_the_filter_and_muvee_log_wins() {
    let dir = util::temp_dir("log-filter");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(util::bin());
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("NODE_ROLE", "builder")
            .env("DATA_DIR", dir.join("data"))
            .env("CONTROL_PLANE_URL", "http://127.0.0.1:1")
            .env("DOCKER_CLI", "/bin/false")
            .args(["check"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stderr).into_owned()
    };
    assert!(run(&[("RUST_LOG", "debug")]).contains("DEBUG running: git"));
    assert!(run(&[("MUVEE_LOG", "debug")]).contains("DEBUG running: git"));
    let both = run(&[("MUVEE_LOG", "info"), ("RUST_LOG", "debug")]);
    assert!(!both.contains("DEBUG"), "{both}");
    assert!(!run(&[]).contains("DEBUG"));
}
