//! The agent loop against the fake control plane: protocol shapes for both server versions,
//! outages, restarts, signals. External commands are PATH shims (tests/fixtures/bin), except
//! where a test says it uses the real Docker engine.

use crate::fake_cp::{FakeCp, Fault, Version};
use crate::test_agent::{shims, TestAgent, SECRET};
use crate::util::{self, temp_dir, test_name};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub fn statuses(cp: &FakeCp, task: &str) -> Vec<String> {
    cp.completions(task)
        .iter()
        .map(|c| c["status"].as_str().unwrap_or("").to_string())
        .collect()
}

pub fn wait_final(cp: &FakeCp, task: &str, secs: u64) -> Value {
    cp.wait_for(
        &format!("final report of {task}"),
        Duration::from_secs(secs),
        |cp| {
            statuses(cp, task)
                .iter()
                .any(|s| s == "completed" || s == "failed")
        },
    );
    // A hung `running` report may be recorded after the final one.
    cp.completions(task)
        .into_iter()
        .rfind(|c| c["status"] == "completed" || c["status"] == "failed")
        .unwrap()
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn round_trip_today_cleanup_reports_running_then_completed() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-roundtrip");
    let agent = TestAgent::builder("deploy").cp(&cp).dir(&dir).start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "myapp"}));
    wait_final(&cp, &task, 20);
    let raw: Vec<String> = cp
        .completion_bodies_raw(&task)
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(
        raw,
        [r#"{"status":"running"}"#, r#"{"status":"completed"}"#]
    );
    assert_eq!(cp.task_status(&task), "completed");
    assert!(
        agent
            .calls()
            .contains(&"docker rm -f muvee-myapp".to_string()),
        "{:?}",
        agent.calls()
    );

    // Register carries the Go Node shape with max_storage_bytes; every request the secret.
    let reg = cp.requests_to("/api/agent/register");
    let body = reg[0].json().unwrap();
    assert_eq!(body["role"], "deploy");
    assert_eq!(body["max_storage_bytes"], 107374182400u64);
    assert_eq!(body["hostname"], dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(body["host_ip"], "127.0.0.1");
    assert!(body.get("max_storage").is_none());
    assert!(cp
        .requests()
        .iter()
        .all(|r| r.header("x-agent-secret") == Some(SECRET)));
    assert!(!agent.log().contains(SECRET), "secret in agent log");
}

#[test]
fn march_server_unknown_type_and_wrong_role_fail_with_reason() {
    let cp = FakeCp::start(Version::March, SECRET);
    let dir = temp_dir("agent-unknown");
    let _agent = TestAgent::builder("deploy").cp(&cp).dir(&dir).start();
    let odd = cp.add_task_for_role("deploy", "frobnicate", "", json!({}));
    let build = cp.add_task_for_role("deploy", "build", "", json!({}));
    let bad = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": 42}));
    let c = wait_final(&cp, &odd, 20);
    assert_eq!(c["status"], "failed");
    assert!(
        c["result"]
            .as_str()
            .unwrap()
            .contains("unknown task type \"frobnicate\""),
        "{c}"
    );
    let c = wait_final(&cp, &build, 20);
    assert_eq!(
        c["result"],
        "task type \"build\" is not run by a deploy node"
    );
    let c = wait_final(&cp, &bad, 20);
    assert_eq!(
        c["result"],
        "payload field `domain_prefix`: expected a string, got number 42"
    );
}

#[test]
fn wrong_secret_is_logged_and_retried_with_backoff() {
    let cp = FakeCp::start(Version::Today, "the-real-secret-77");
    let dir = temp_dir("agent-secret");
    let mut agent = TestAgent::builder("builder").cp(&cp).dir(&dir).start();
    std::thread::sleep(Duration::from_secs(5));
    let attempts = cp.requests_to("/api/agent/register").len();
    assert!(
        (2..=8).contains(&attempts),
        "expected a few backed-off retries, got {attempts}"
    );
    assert!(
        agent
            .log()
            .contains("the control plane rejected AGENT_SECRET"),
        "{}",
        agent.log()
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "agent must keep running"
    );
}

#[test]
fn html_answer_is_an_error_naming_url_and_content_type() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.inject("/api/agent/register", Fault::Html, 1);
    let dir = temp_dir("agent-html");
    // A trailing slash must not turn paths into //api/... (which the SPA answers with HTML).
    let agent = TestAgent::builder("builder")
        .url(&format!("{}/", cp.url()))
        .dir(&dir)
        .start();
    cp.wait_for("a poll after recovering", Duration::from_secs(20), |cp| {
        !cp.requests_to("/api/agent/tasks").is_empty()
    });
    let log = agent.log();
    assert!(
        log.contains("/api/agent/register answered 200 with content type \"text/html"),
        "{log}"
    );
    assert!(
        cp.requests().iter().all(|r| r.path().starts_with("/api/")),
        "no //api paths"
    );
}

#[test]
fn forgotten_node_registers_again() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-forgotten");
    let agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "10m")
        .start();
    cp.wait_for("first poll", Duration::from_secs(20), |cp| {
        !cp.requests_to("/api/agent/tasks").is_empty()
    });
    cp.forget_nodes();
    cp.wait_for("re-registration", Duration::from_secs(20), |cp| {
        cp.register_count() >= 2
    });
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "again"}));
    assert_eq!(wait_final(&cp, &task, 20)["status"], "completed");
    assert!(
        agent.log().contains("no longer knows node"),
        "{}",
        agent.log()
    );
}

#[test]
fn periodic_reregistration_keeps_march_node_alive() {
    let cp = FakeCp::start(Version::March, SECRET);
    let dir = temp_dir("agent-heartbeat");
    let _agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .start();
    // Each heartbeat registers, then re-reads the config.
    cp.wait_for(
        "three registrations, each with a config refresh",
        Duration::from_secs(20),
        |cp| cp.register_count() >= 3 && cp.requests_to("/api/agent/config").len() >= 3,
    );
    assert_eq!(
        cp.nodes().len(),
        1,
        "re-registration is an upsert, not a new node"
    );
}

#[test]
fn same_task_polled_twice_runs_once() {
    let cp = FakeCp::start(Version::Today, SECRET);
    // The running report fails twice, so the server keeps listing the task as pending.
    cp.inject(
        "/api/agent/tasks/",
        Fault::Status(500, "application/json", "{\"error\":\"db down\"}\n".into()),
        2,
    );
    let dir = temp_dir("agent-dedupe");
    let agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "1")
        .start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "once"}));
    wait_final(&cp, &task, 30);
    let polls_listing = cp.requests_to("/api/agent/tasks?").len();
    assert!(polls_listing >= 2);
    let runs = agent
        .calls()
        .iter()
        .filter(|c| *c == "docker rm -f muvee-once")
        .count();
    assert_eq!(runs, 1, "{:?}", agent.calls());
    assert_eq!(statuses(&cp, &task), ["running", "completed"]);
}

#[test]
fn outage_mid_task_loses_no_report() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-outage");
    let agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "2")
        .start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "outage"}));
    cp.wait_for("running report", Duration::from_secs(20), |cp| {
        statuses(cp, &task) == ["running"]
    });
    cp.go_down();
    std::thread::sleep(Duration::from_secs(30));
    assert!(
        agent
            .calls()
            .iter()
            .any(|c| *c == "docker rm -f muvee-outage"),
        "task ran while the server was down"
    );
    cp.come_up();
    assert_eq!(wait_final(&cp, &task, 90)["status"], "completed");
    assert_eq!(statuses(&cp, &task), ["running", "completed"]);
}

#[test]
fn sigterm_lets_the_running_task_finish() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-sigterm");
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "3")
        .start();
    let task = cp.add_task_for_role(
        "deploy",
        "cleanup",
        "",
        json!({"domain_prefix": "graceful"}),
    );
    cp.wait_for("running report", Duration::from_secs(20), |cp| {
        statuses(cp, &task) == ["running"]
    });
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("agent exits after the task");
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert_eq!(statuses(&cp, &task), ["running", "completed"]);
    let polls_after: Vec<_> = cp.requests_to("/api/agent/tasks?");
    let last_poll = polls_after.last().unwrap().at;
    let final_report = cp
        .requests_to(&format!("/api/agent/tasks/{task}/complete"))
        .last()
        .unwrap()
        .at;
    assert!(last_poll < final_report, "no polling after SIGTERM");
}

#[test]
fn second_sigterm_cancels_and_leaves_no_child() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-cancel");
    // A duration unique to this run, so pgrep cannot see another run's sleeps.
    let marker = format!("61.{}", std::process::id());
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", &marker)
        .start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "cancel"}));
    cp.wait_for("running report", Duration::from_secs(20), |cp| {
        statuses(cp, &task) == ["running"]
    });
    assert!(
        util::poll(20, || dir.join("pids").exists()),
        "timed out waiting for the docker shim"
    );
    agent.signal(libc::SIGTERM);
    // Two signals in quick succession could merge; the second must come after the first.
    assert!(
        util::poll(20, || { agent.log().contains("shutting down: waiting") }),
        "timed out waiting for the drain log line"
    );
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("agent exits after cancel");
    assert!(status.success(), "{status:?}");
    let c = cp.completions(&task).last().cloned().unwrap();
    assert_eq!(
        c,
        json!({"status": "failed", "result": "canceled: agent shutting down"})
    );
    let pids = std::fs::read_to_string(dir.join("pids")).unwrap();
    for pid in pids.lines() {
        assert!(!alive(pid), "shim {pid} survived");
    }
    let sleeps = Command::new("pgrep")
        .args(["-f", &format!("sleep {marker}")])
        .output()
        .unwrap();
    assert!(
        sleeps.stdout.is_empty(),
        "a grandchild survived: {}",
        String::from_utf8_lossy(&sleeps.stdout)
    );
}

#[test]
fn kill_9_then_restart_reports_interrupted_task_and_flushes_outbox() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-kill9");
    // Task A finishes while the server is down: its report waits in the outbox.
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "5")
        .start();
    let a = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "queued"}));
    cp.wait_for("running report of A", Duration::from_secs(20), |cp| {
        statuses(cp, &a) == ["running"]
    });
    cp.go_down();
    // Wait until A's final report is persisted in the outbox (the server is down, so it
    // cannot have been delivered), then kill.
    let outbox = dir.join("data/state/outbox");
    let a_final_queued = || {
        std::fs::read_dir(&outbox)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .any(|e| {
                let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                body.contains(&a) && body.contains("completed")
            })
    };
    assert!(
        util::poll(30, a_final_queued),
        "timed out waiting for A's final report in the outbox"
    );
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).unwrap();
    drop(agent);
    cp.come_up();

    // Task B is interrupted by kill -9 mid-run.
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "30")
        .start();
    assert_eq!(
        wait_final(&cp, &a, 30)["status"],
        "completed",
        "outbox flushed on start"
    );
    let b = cp.add_task_for_role(
        "deploy",
        "cleanup",
        "",
        json!({"domain_prefix": "interrupted"}),
    );
    cp.wait_for("running report of B", Duration::from_secs(20), |cp| {
        statuses(cp, &b) == ["running"]
    });
    assert!(
        util::poll(20, || {
            agent
                .calls()
                .iter()
                .any(|c| c.contains("muvee-interrupted"))
        }),
        "timed out waiting for B's docker call"
    );
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).unwrap();
    drop(agent);
    let b_calls = |a: &TestAgent| {
        a.calls()
            .iter()
            .filter(|c| c.contains("interrupted"))
            .count()
    };

    let agent = TestAgent::builder("deploy").cp(&cp).dir(&dir).start();
    let calls_before = b_calls(&agent);
    assert!(calls_before >= 1, "B had started");
    let c = wait_final(&cp, &b, 30);
    assert_eq!(
        c,
        json!({"status": "failed", "result": "agent restarted during task"})
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        statuses(&cp, &b),
        ["running", "failed"],
        "B is not run again"
    );
    assert_eq!(
        b_calls(&agent),
        calls_before,
        "B's commands did not run again"
    );
}

#[test]
fn build_logs_are_batched_on_today_and_skipped_on_march() {
    let payload = json!({
        "git_url": "https://git.example/app.git", "git_branch": "main", "dockerfile_path": "Dockerfile",
        "deployment_id": "c0ffee00-1234-4abc-9def-000000000001", "project_id": "7a7a7a7a-0000-4000-8000-000000000007",
        "domain_prefix": "logs"
    });
    let env = [
        ("FAKE_GIT_LINES", "500"),
        ("FAKE_GIT_EXIT", "128"),
        ("REGISTRY_ADDR", "127.0.0.1:5000"),
    ];
    let dep = "c0ffee00-1234-4abc-9def-000000000001";

    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    let dir = temp_dir("agent-logs-today");
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = cp.add_task_for_role("builder", "build", dep, payload.clone());
    let c = wait_final(&cp, &task, 30);
    assert_eq!(c["status"], "failed");
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    let expected: String = (1..=500)
        .map(|i| format!("remote: progress line {i}\n"))
        .collect();
    assert!(
        log.contains(&expected),
        "all 500 lines, in order, byte-identical:\n{log}"
    );
    let requests = cp
        .requests_to(&format!("/api/deployments/{dep}/logs"))
        .len();
    assert!(requests < 50, "lines are batched, got {requests} requests");

    let cp = FakeCp::start(Version::March, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    let dir = temp_dir("agent-logs-march");
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = cp.add_task_for_role("builder", "build", dep, payload);
    assert_eq!(wait_final(&cp, &task, 30)["status"], "failed");
    assert_eq!(
        cp.requests_to(&format!("/api/deployments/{dep}/logs"))
            .len(),
        1,
        "stops after the 404"
    );
    assert_eq!(agent.log().matches("no log route (404").count(), 1);
}

#[test]
fn bad_configuration_exits_2_naming_the_value() {
    for (k, v, expect) in [
        ("NODE_ROLE", "web", "NODE_ROLE: invalid value \"web\""),
        (
            "CONTROL_PLANE_URL",
            "ftp://x",
            "CONTROL_PLANE_URL: invalid value \"ftp://x\"",
        ),
        (
            "DATA_DIR",
            "/proc/muvee-nope",
            "DATA_DIR: /proc/muvee-nope is not writable",
        ),
        // Values that once aborted with a panic (exit 134).
        (
            "POLL_INTERVAL",
            "99999999999999999999s",
            "POLL_INTERVAL: invalid value \"99999999999999999999s\"",
        ),
        (
            "HEARTBEAT_INTERVAL",
            "18446744073709551615",
            "HEARTBEAT_INTERVAL: invalid value \"18446744073709551615\"",
        ),
    ] {
        let out = Command::new(util::bin())
            .env_clear()
            .env("NODE_ROLE", "deploy")
            .env("DATA_DIR", temp_dir("agent-badcfg"))
            .env(k, v)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{k}={v}: {}",
            util::describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{}",
            util::describe(&out)
        );
    }
}

#[test]
fn run_task_round_trip_and_exit_codes() {
    let path = format!("{}:/usr/bin:/bin", shims().display());
    let dir = temp_dir("runtask");
    let log = dir.join("calls.log");
    let task = r#"{"ID":"9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10","Type":"cleanup","NodeID":null,"DeploymentID":"c0ffee00-1234-4abc-9def-000000000001","Payload":{"domain_prefix":"myapp"},"PayloadJSON":"{\"domain_prefix\": \"myapp\"}","Status":"pending","Result":"","CreatedAt":"2026-11-02T08:16:01.402113Z","UpdatedAt":"2026-11-02T08:16:01.402113Z"}"#;
    let env = [("PATH", path.as_str()), ("FAKE_LOG", log.to_str().unwrap())];
    let out = util::run_task(&[], task, &env);
    assert_eq!(out.status.code(), Some(0), "{}", util::describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"status\":\"completed\"}\n"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .any(|l| l == "docker rm -f muvee-myapp"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    let out = util::run_task(&["--type", "cleanup"], r#"{"domain_prefix":"../x"}"#, &env);
    assert_eq!(out.status.code(), Some(1), "{}", util::describe(&out));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "failed");
    assert!(
        body["result"].as_str().unwrap().contains("`domain_prefix`"),
        "{body}"
    );

    // A compose deploy is validated before anything runs; an unknown mode is refused.
    let compose = r#"{"mode":"compose","domain_prefix":"shop","project_id":"7a7a7a7a-0000-4000-8000-000000000007"}"#;
    let out = util::run_task(&["--type", "deploy"], compose, &env);
    assert_eq!(out.status.code(), Some(1), "{}", util::describe(&out));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        body["result"], "payload field `git_url` or `inline_compose_yaml` is required",
        "{body}"
    );
    let swarm = r#"{"mode":"swarm","domain_prefix":"shop"}"#;
    let out = util::run_task(&["--type", "deploy"], swarm, &env);
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        body["result"]
            .as_str()
            .unwrap()
            .starts_with("payload field `mode`: \"swarm\" deployments are not supported"),
        "{body}"
    );

    let out = util::run_task(&[], "not json", &env);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("input is not JSON"));
    let out = util::run_task(&[], r#"{"domain_prefix":"x"}"#, &env);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cleanup_removes_a_real_container_and_tolerates_a_missing_one() {
    if !util::require_docker(test_name!()) {
        return;
    }
    let docker = util::docker_cli();
    let name = format!("muvee-cleanup-it-{}", std::process::id());
    let _ = Command::new(&docker).args(["rm", "-f", &name]).output();
    util::sh(Command::new(&docker).args([
        "run",
        "-d",
        "--name",
        &name,
        &util::base_image(),
        "sleep",
        "300",
    ]));
    let payload = format!(
        r#"{{"domain_prefix":"{}"}}"#,
        name.trim_start_matches("muvee-")
    );
    for _ in 0..2 {
        let out = util::run_task(&["--type", "cleanup"], &payload, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", util::describe(&out));
    }
    let ps = util::sh(Command::new(&docker).args([
        "ps",
        "-a",
        "--filter",
        &format!("name=^{name}$"),
        "--format",
        "{{.Names}}",
    ]));
    assert!(ps.trim().is_empty(), "container still there: {ps}");
}

#[test]
fn resets_hangs_and_garbage_are_survived() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.inject("/api/agent/config", Fault::Garbage, 1);
    cp.inject("/api/agent/tasks?", Fault::Reset, 2);
    // Longer than the client's 20 s timeout: the report is sent again.
    cp.inject("/api/agent/tasks/", Fault::Hang(Duration::from_secs(25)), 1);
    let dir = temp_dir("agent-faults");
    let agent = TestAgent::builder("deploy").cp(&cp).dir(&dir).start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "faults"}));
    assert_eq!(wait_final(&cp, &task, 90)["status"], "completed");
    assert_eq!(
        agent
            .calls()
            .iter()
            .filter(|c| *c == "docker rm -f muvee-faults")
            .count(),
        1
    );
    let log = agent.log();
    assert!(
        log.contains("/api/agent/config answered 200 with content type \"application/json\""),
        "{log}"
    );
}

#[test]
fn works_as_pid_1() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("agent-pid1");
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_DOCKER_SLEEP", "2")
        // Pids recorded inside the namespace mean nothing outside it: record none.
        .env("FAKE_PIDFILE", "")
        .wrapped_in(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
        .start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "pid1"}));
    cp.wait_for("running report", Duration::from_secs(20), |cp| {
        statuses(cp, &task) == ["running"]
    });
    // The agent is unshare's child, PID 1 in its namespace.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.child.id())).unwrap();
    let pid = children
        .split_whitespace()
        .next()
        .expect("agent pid")
        .to_string();
    let ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        ns_pid
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{ns_pid}"
    );
    util::signal(pid.parse().unwrap(), libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("PID 1 agent exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", agent.log());
    assert_eq!(statuses(&cp, &task), ["running", "completed"]);
}

#[test]
fn check_reports_each_problem_with_a_fix() {
    let cp = FakeCp::start(Version::Today, SECRET);
    // No registry to probe: the check says so (a warning) whether or not one runs here.
    cp.set_config("registry_addr", "");
    let dir = temp_dir("agent-check");
    let run = |secret: &str| {
        Command::new(util::bin())
            .arg("check")
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", shims().display()))
            .env("NODE_ROLE", "deploy")
            .env("CONTROL_PLANE_URL", cp.url())
            .env("AGENT_SECRET", secret)
            .env("DATA_DIR", dir.join("data"))
            .output()
            .unwrap()
    };
    let out = run(SECRET);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", util::describe(&out));
    for line in [
        "ok    git:",
        "ok    docker daemon:",
        "ok    rsync:",
        "ok    DATA_DIR:",
        "ok    control plane:",
        "warn  registry: no registry configured",
        "warn  workspace share: path not configured",
        "ok    compose policy: baseline:",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    let out = run("wrong-secret");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("error control plane: the control plane rejected AGENT_SECRET"),
        "{text}"
    );
    assert!(
        text.contains("fix: check CONTROL_PLANE_URL and AGENT_SECRET"),
        "{text}"
    );
    assert!(!text.contains("wrong-secret"));
}

#[test]
fn registry_login_follows_rotated_credentials_and_failures_are_retried() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5999");
    cp.set_config("registry_user", "ci-bot");
    cp.set_config("registry_password", "first-password-1");
    let dir = temp_dir("agent-login");
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .start();
    let logins = |a: &TestAgent| {
        a.calls()
            .iter()
            .filter(|c| c.starts_with("docker login"))
            .count()
    };
    util::poll(20, || logins(&agent) >= 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(logins(&agent), 1, "unchanged credentials: one login");
    cp.set_config("registry_password", "rotated-password-2");
    util::poll(20, || logins(&agent) >= 2);
    assert_eq!(logins(&agent), 2, "rotated password: a new login");
    let calls = agent.calls().join("\n");
    assert!(
        calls.contains("docker login 127.0.0.1:5999 -u ci-bot --password-stdin"),
        "{calls}"
    );
    assert!(
        !calls.contains("password-1") && !calls.contains("password-2"),
        "{calls}"
    );
    assert!(!agent.log().contains("password-2"));

    // A registry that refuses: a clear error, retried, and the agent keeps running.
    let dir = temp_dir("agent-login-fail");
    let mut agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .env("FAKE_DOCKER_EXIT", "1")
        .start();
    util::poll(20, || logins(&agent) >= 3);
    assert!(logins(&agent) >= 3, "login retried");
    assert!(
        agent
            .log()
            .contains("docker login to 127.0.0.1:5999 failed (will retry at the next heartbeat)"),
        "{}",
        agent.log()
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "a failed login is not fatal"
    );
}

/// A build task printing `lines` numbered lines (the git stand-in) for deployment `dep`.
pub fn chatty_build(cp: &FakeCp, dep: &str) -> String {
    let payload = json!({
        "git_url": "https://git.example/app.git", "git_branch": "main", "dockerfile_path": "Dockerfile",
        "deployment_id": dep, "project_id": "7a7a7a7a-0000-4000-8000-000000000008", "domain_prefix": "logs"
    });
    cp.add_task_for_role("builder", "build", dep, payload)
}

/// The numbered stand-in lines of a stored log are exactly 1..=n, in order.
fn assert_all_lines(log: &str, n: usize) {
    let nums = crate::logs::numbers(log);
    assert_eq!(nums.len(), n, "lines delivered");
    assert!(
        nums.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "out of order"
    );
}

/// The control plane stops taking logs while the build prints 12 MB: the backlog spills to
/// disk and every line arrives, in order, before the final report; the spill is removed.
#[test]
fn a_stalled_log_route_loses_no_line_and_the_spill_is_removed() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    cp.inject("/api/deployments/", Fault::Hang(Duration::from_secs(12)), 1);
    let dep = "c0ffee00-1234-4abc-9def-0000000000fe";
    let dir = temp_dir("agent-logs-spill");
    let env = [("FAKE_GIT_LINES", "450000"), ("FAKE_GIT_EXIT", "128")];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 180)["status"], "failed");
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    assert_all_lines(&log, 450_000);
    assert!(!log.contains("log lines dropped"));
    let spills = dir.join("data/state/logs");
    let left: Vec<_> = std::fs::read_dir(&spills)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(agent);
}

/// Beyond LOG_SPILL_MAX the agent drops lines, and one marker in the log says how many.
#[test]
fn log_overflow_leaves_a_marker_and_does_not_block_the_task() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    // The first log request hangs while the build prints more than memory + LOG_SPILL_MAX.
    // 15 s: long enough for a loaded machine to print it, shorter than the client's 20 s timeout.
    cp.inject("/api/deployments/", Fault::Hang(Duration::from_secs(15)), 1);
    let dep = "c0ffee00-1234-4abc-9def-0000000000ff";
    let dir = temp_dir("agent-logs-overflow");
    let env = [
        ("FAKE_GIT_LINES", "450000"),
        ("FAKE_GIT_EXIT", "128"),
        ("LOG_SPILL_MAX", "1M"),
    ];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 120)["status"], "failed");
    let marker =
        "log lines dropped: more than LOG_SPILL_MAX (1048576 bytes) waited for the control plane]";
    // On a slow machine the close may hand the rest to the late-log queue: it follows.
    let log = || String::from_utf8(cp.logs(dep)).unwrap();
    util::poll(30, || log().contains(marker));
    let log = log();
    assert_eq!(
        log.matches(marker).count(),
        1,
        "no single marker in {} bytes",
        log.len()
    );
    assert!(
        log.contains("remote: progress line 1\n"),
        "early lines kept"
    );
    assert!(log.len() < 10 << 20, "bounded: {} bytes", log.len());
    assert!(agent.calls().iter().any(|c| c.contains(" fetch ")));
}

/// The control plane goes away while a build prints and comes back: every line arrives,
/// once and in order (after the final report when the task ended during the outage: its
/// lines then follow from the late-log queue).
#[test]
fn logs_printed_during_an_outage_arrive_after_it() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    let dep = "c0ffee00-1234-4abc-9def-0000000000fd";
    let dir = temp_dir("agent-logs-outage");
    let env = [
        ("FAKE_GIT_SLEEP", "2"),
        ("FAKE_GIT_LINES", "100000"),
        ("FAKE_GIT_EXIT", "128"),
    ];
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    cp.wait_for("running", Duration::from_secs(30), |cp| {
        statuses(cp, &task) == ["running"]
    });
    cp.go_down();
    std::thread::sleep(Duration::from_secs(6));
    cp.come_up();
    assert_eq!(wait_final(&cp, &task, 120)["status"], "failed");
    crate::logs::assert_every_line_once(&cp, dep, 100_000, 60);
}

#[test]
fn builds_beyond_builder_max_concurrent_wait_already_running() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    let dir = temp_dir("agent-build-slots");
    let env = [
        ("FAKE_GIT_SLEEP", "8"),
        ("FAKE_GIT_EXIT", "128"),
        ("BUILDER_MAX_CONCURRENT", "1"),
    ];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let payload = |n: u32| {
        json!({
            "git_url": "https://git.example/app.git", "git_branch": "main", "dockerfile_path": "Dockerfile",
            "deployment_id": format!("c0ffee00-1234-4abc-9def-00000000010{n}"),
            "project_id": "7a7a7a7a-0000-4000-8000-000000000009", "domain_prefix": "slots"
        })
    };
    let a = cp.add_task_for_role("builder", "build", "", payload(1));
    let b = cp.add_task_for_role("builder", "build", "", payload(2));
    cp.wait_for("both running", Duration::from_secs(20), |cp| {
        statuses(cp, &a) == ["running"] && statuses(cp, &b) == ["running"]
    });
    // Both are running while only one clone (the git cache's fetch) has started.
    let clones = |a: &TestAgent| a.calls().iter().filter(|c| c.contains(" fetch ")).count();
    // The first clone may be logged a moment after both reports (a loaded machine).
    assert!(util::poll(5, || clones(&agent) >= 1), "{:?}", agent.calls());
    assert_eq!(clones(&agent), 1, "{:?}", agent.calls());
    wait_final(&cp, &a, 30);
    wait_final(&cp, &b, 30);
    let seq: Vec<String> = agent
        .calls()
        .into_iter()
        .filter(|c| c.contains(" fetch ") || c == "git done")
        .map(|c| {
            if c == "git done" {
                "done".into()
            } else {
                "clone".into()
            }
        })
        .collect();
    assert_eq!(
        seq,
        ["clone", "done", "clone", "done"],
        "builds never overlap"
    );
}

#[test]
fn deploy_node_reports_container_statuses_with_host_port() {
    if !util::require_docker(test_name!()) {
        return;
    }
    let docker = util::docker_cli();
    let prefix = format!("status-it-{}", std::process::id());
    let name = format!("muvee-{prefix}");
    let aside = format!("{name}-old-0123456789ab");
    let rm = || {
        let _ = Command::new(&docker)
            .args(["rm", "-f", &name, &aside])
            .output();
    };
    rm();
    // This node's apps (NODE_NAME is the dir's name): only those are reported.
    let dir = temp_dir("agent-statuses");
    let node = dir.file_name().unwrap().to_str().unwrap().to_string();
    for n in [&name, &aside] {
        util::sh(Command::new(&docker).args([
            "run",
            "-d",
            "--name",
            n,
            "-p",
            "0:8080",
            "--label",
            &format!("muvee.domain_prefix={prefix}"),
            "--label",
            "muvee.managed=true",
            "--label",
            &format!("muvee.node={node}"),
            "--label",
            "muvee.expose_port=8080",
            &util::base_image(),
            "sleep",
            "300",
        ]));
    }
    let port = util::sh(Command::new(&docker).args(["port", &name, "8080"]));
    let port: u64 = port
        .lines()
        .find_map(|l| l.strip_prefix("0.0.0.0:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let cp = FakeCp::start(Version::Today, SECRET);
    let _agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .real_docker()
        .env("HEARTBEAT_INTERVAL", "1s")
        .start();
    let mine = |cp: &FakeCp| -> Vec<Value> {
        cp.posted("/api/agent/container-statuses")
            .iter()
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .filter(|s| s["domain_prefix"] == prefix.as_str())
            .collect()
    };
    cp.wait_for("a container status", Duration::from_secs(30), |cp| {
        !mine(cp).is_empty()
    });
    rm();
    let statuses = mine(&cp);
    assert_eq!(
        statuses[0],
        json!({"domain_prefix": prefix, "restart_count": 0, "oom_killed": false, "host_port": port})
    );
    assert!(
        statuses.iter().all(|s| s["host_port"] == port),
        "the aside container is not reported: {statuses:?}"
    );
}

/// Issue 16.11: a duration below its minimum (POLL_INTERVAL=0 made thousands of requests a
/// second) stops the agent at start with status 2 and a message naming the variable; no
/// request reaches the control plane.
#[test]
fn absurd_intervals_exit_2_naming_the_variable() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let cases = [
        ("POLL_INTERVAL", "0", "100ms"),
        ("HEARTBEAT_INTERVAL", "0", "1s"),
        ("DEPLOY_HEALTH_TIMEOUT", "0", "1s"),
        ("BUILD_TIMEOUT", "1s", "10s"),
        ("BUILD_IDLE_TIMEOUT", "0", "5s"),
        ("REAP_GRACE", "0", "1s"),
    ];
    let mut agents: Vec<_> = cases
        .iter()
        .map(|&(var, value, min)| {
            let agent = TestAgent::builder("deploy").cp(&cp).env(var, value).start();
            (var, value, min, agent)
        })
        .collect();
    for (var, value, min, agent) in &mut agents {
        let status = agent.wait_exit(Duration::from_secs(20));
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{var}={value}");
        let want = format!("{var}: invalid value \"{value}\" (expected at least {min})");
        assert!(agent.log().contains(&want), "{}", agent.log());
    }
    assert_eq!(cp.requests().len(), 0, "{}", cp.dump(10));
}
