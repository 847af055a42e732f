//! Promises under faults, against the fake control plane (which reproduces today's server's
//! NUL 500s) and real files: a poison report never blocks others, a full disk loses no task
//! and no report, a restart never reports a task twice with different outcomes.

use crate::agent::{chatty_build, statuses, wait_final};
use crate::fake_cp::{FakeCp, Fault, Version};
use crate::test_agent::{TestAgent, SECRET};
use crate::util::{self, temp_dir, test_name, RemoveContainers};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DEP_A: &str = "c0ffee00-1234-4abc-9def-0000000000a1";
const DEP_B: &str = "c0ffee00-1234-4abc-9def-0000000000b1";

fn builder_cp() -> FakeCp {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    cp
}

/// Output with a NUL byte and an escape: the report and the log reach today's server (which
/// refuses NUL) cleaned. A report the server keeps rejecting holds no other task back, and
/// goes out soon after the server takes it again, although its backoff had grown.
#[test]
fn a_poison_report_blocks_no_other_and_nul_never_reaches_the_server() {
    let cp = builder_cp();
    let dir = temp_dir("faults-poison");
    let env = [("FAKE_GIT_NUL", "1"), ("FAKE_GIT_EXIT", "128")];
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    // Task A's reports are refused for as long as the fault lasts.
    let a = chatty_build(&cp, DEP_A);
    cp.inject(&format!("/api/agent/tasks/{a}/complete"), Fault::Status(500, "application/json", r#"{"error":"ERROR: invalid byte sequence for encoding \"UTF8\": 0x00 (SQLSTATE 22021)"}"#.into()), 100_000);
    let attempts = || {
        cp.requests_to(&format!("/api/agent/tasks/{a}/complete"))
            .len()
    };
    assert!(util::poll(60, || attempts() >= 5), "A was not retried");
    // B is polled and reported while A still fails.
    let b = chatty_build(&cp, DEP_B);
    let final_b = wait_final(&cp, &b, 30);
    assert_eq!(final_b["status"], "failed");
    let why = final_b["result"].as_str().unwrap();
    assert!(
        why.contains("fatal: bad \u{fffd} byte \u{fffd}[31mred"),
        "{why}"
    );
    assert!(statuses(&cp, &a).is_empty(), "A got through while refused");
    // The server takes A again: it arrives within a poll, not after its grown backoff.
    cp.clear_faults();
    let t0 = Instant::now();
    assert_eq!(wait_final(&cp, &a, 30)["status"], "failed");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(statuses(&cp, &a), ["running", "failed"]);
    let log = String::from_utf8(cp.logs(DEP_B)).unwrap();
    assert!(log.contains("fatal: bad \u{fffd} byte"), "{log}");
    for t in [&a, &b] {
        for raw in cp.completion_bodies_raw(t) {
            assert!(
                !String::from_utf8_lossy(&raw).contains("\\u0000"),
                "NUL sent"
            );
        }
    }
}

/// A tmpfs mounted for one test (needs root; unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Option<Tmpfs> {
        let dir = temp_dir(name);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> PathBuf {
        let f = self.0.join("filler");
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("cat /dev/zero > {} 2>/dev/null", f.display()))
            .status();
        f
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn tmpfs_or_skip(name: &str, test: &str) -> Option<Tmpfs> {
    let t = Tmpfs::mount(name, "4m");
    if t.is_none() {
        assert!(
            std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "{test}: cannot mount a tmpfs (CI runs as root)"
        );
        eprintln!("SKIPPED {test}: cannot mount a tmpfs (not root?)");
    }
    t
}

fn files(dir: &Path) -> Vec<(String, u64)> {
    let rd = std::fs::read_dir(dir).into_iter().flatten().flatten();
    rd.map(|e| {
        (
            e.file_name().to_string_lossy().into_owned(),
            e.metadata().map_or(0, |m| m.len()),
        )
    })
    .collect()
}

/// With DATA_DIR full, a polled task is neither run nor marked taken: it runs once space
/// returns. A task whose reports cannot be written is still reported (from memory), and a
/// restart after space returned does not report it again as interrupted.
#[test]
fn a_full_disk_loses_no_task_and_no_report() {
    let Some(fs) = tmpfs_or_skip("faults-disk", test_name!()) else {
        return;
    };
    let cp = builder_cp();
    // DATA_DIR on the small tmpfs; the agent's own log elsewhere.
    let dir = temp_dir("faults-disk-agent");
    let data = fs.0.join("data");
    let env = [
        ("FAKE_GIT_EXIT", "128"),
        ("FAKE_GIT_SLEEP", "3"),
        ("DATA_DIR", data.to_str().unwrap()),
    ];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    cp.wait_for("registered", Duration::from_secs(20), |cp| {
        cp.register_count() >= 1
    });
    let filler = fs.fill();
    let a = chatty_build(&cp, DEP_A);
    assert!(
        util::poll(20, || agent
            .log()
            .contains(&format!("cannot record task {a} in the journal"))),
        "{}",
        agent.log()
    );
    assert!(
        statuses(&cp, &a).is_empty(),
        "a task that could not be recorded ran"
    );
    let tasks = data.join("state/tasks");
    assert!(
        files(&tasks)
            .iter()
            .all(|(n, len)| *len > 0 && !n.ends_with(".tmp")),
        "{:?}",
        files(&tasks)
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(wait_final(&cp, &a, 60)["status"], "failed");

    // B runs, then the disk fills up before it ends: its final report goes out from memory.
    let b = chatty_build(&cp, DEP_B);
    cp.wait_for("B running", Duration::from_secs(20), |cp| {
        statuses(cp, &b) == ["running"]
    });
    let filler = fs.fill();
    let final_b = wait_final(&cp, &b, 60);
    assert!(
        final_b["result"]
            .as_str()
            .unwrap()
            .contains("git clone exited 128"),
        "{final_b}"
    );
    std::fs::remove_file(&filler).unwrap();
    // Space is back: the journal catches up at the next poll; then a restart.
    let journal_b = tasks.join(format!("{b}.json"));
    assert!(
        util::poll(20, || std::fs::read_to_string(&journal_b)
            .unwrap_or_default()
            .contains("\"done\"")),
        "journal entry of B never written"
    );
    drop(agent);
    let registered = cp.register_count();
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    cp.wait_for("registered again", Duration::from_secs(20), |cp| {
        cp.register_count() > registered
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(statuses(&cp, &b), ["running", "failed"], "B reported again");
    assert_eq!(statuses(&cp, &a), ["running", "failed"], "A reported again");
}

/// Planted state of a previous run: a running journal entry whose final report was queued
/// (or already delivered, leaving a tombstone). The restarted agent reports that outcome and
/// never `agent restarted during task`, also among thousands of journal entries.
#[test]
fn a_restart_never_reports_a_task_again_with_another_outcome() {
    let cp = builder_cp();
    let dir = temp_dir("faults-restart");
    let (tasks, outbox) = (dir.join("data/state/tasks"), dir.join("data/state/outbox"));
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::create_dir_all(&outbox).unwrap();
    let entry = |id: &str, state: &str| {
        let e = json!({"id": id, "type": "build", "deployment_id": "", "state": state, "at": 1_900_000_000u64});
        std::fs::write(tasks.join(format!("{id}.json")), e.to_string()).unwrap();
    };
    for i in 0..3000 {
        entry(&format!("done-{i:04}"), "done");
    }
    let queued = "7e570000-0000-4000-8000-000000000001";
    let delivered = "7e570000-0000-4000-8000-000000000002";
    let interrupted = "7e570000-0000-4000-8000-000000000003";
    for id in [queued, delivered, interrupted] {
        entry(id, "running");
    }
    let report = json!({"task_id": queued, "body": {"image_tag": "r/p:1", "status": "completed"}});
    std::fs::write(
        outbox.join(format!("{:020}-{queued}.json", 1)),
        report.to_string(),
    )
    .unwrap();
    std::fs::write(outbox.join(format!("{delivered}.sent")), "").unwrap();
    let _agent = TestAgent::builder("builder").cp(&cp).dir(&dir).start();
    assert_eq!(wait_final(&cp, queued, 30)["status"], "completed");
    assert_eq!(
        wait_final(&cp, interrupted, 30),
        json!({"status": "failed", "result": "agent restarted during task"})
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(statuses(&cp, queued), ["completed"]);
    assert!(
        statuses(&cp, delivered).is_empty(),
        "{:?}",
        statuses(&cp, delivered)
    );
    // Its journal entry is done now, so the tombstone goes.
    assert!(!outbox.join(format!("{delivered}.sent")).exists());
}

/// Real engine: the agent is killed (-9) while a replacement waits for the new container to
/// answer. The restarted agent reports the deploy failed, removes the new container and gives
/// the old one its name back before its first status report, which carries the old port.
#[test]
fn kill_9_during_a_deploys_health_wait_is_reconciled_at_start() {
    if !util::require_docker(test_name!()) {
        return;
    }
    crate::deployer::images();
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-reconcile");
    let prefix = format!("itf-rec-{}", std::process::id());
    let name = format!("muvee-{prefix}");
    let _cleanup = RemoveContainers::named(&name);
    let deploy_node = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .real_docker()
        .env("DEPLOY_HEALTH_TIMEOUT", "120s")
        .env("HEARTBEAT_INTERVAL", "1s");
    let mut agent = deploy_node.start();
    let deploy = |dep: &str, image: &str| {
        let p = json!({"image_tag": image, "deployment_id": dep, "project_id": "proj-rec",
                       "domain_prefix": prefix, "container_port": 8080, "env_vars": {"BODY": "old"}});
        cp.add_task_for_role("deploy", "deploy", dep, p)
    };
    let (dep1, dep2) = (
        "d1000000-0000-4000-8000-000000000001",
        "d1000000-0000-4000-8000-000000000002",
    );
    let first = wait_final(&cp, &deploy(dep1, crate::deployer::APP), 120);
    assert_eq!(first["status"], "completed", "{first}\n{}", agent.log());
    let port = first["host_port"].as_u64().unwrap() as u16;
    // The replacement never answers HTTP: kill the agent while it waits.
    let second = deploy(dep2, crate::deployer::IDLE);
    let labelled = |dep: &str| {
        let f = format!("label=muvee.deployment_id={dep}");
        let out = util::docker(&["ps", "--filter", &f, "--format", "{{.Names}}"], &[]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        util::poll(120, || labelled(dep2) == name),
        "the new container never ran"
    );
    assert!(labelled(dep1).starts_with(&format!("{name}-old-")));
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).unwrap();
    drop(agent);

    let posted_before = cp.posted("/api/agent/container-statuses").len();
    let _agent = deploy_node.start();
    let r = wait_final(&cp, &second, 30);
    assert_eq!(
        r,
        json!({"status": "failed", "result": "agent restarted during task"})
    );
    assert!(util::poll(30, || cp
        .posted("/api/agent/container-statuses")
        .len()
        > posted_before));
    let statuses = cp.posted("/api/agent/container-statuses");
    let first_after = statuses[posted_before].to_string();
    assert!(
        first_after.contains(&format!("\"host_port\":{port}")),
        "{first_after}"
    );
    assert_eq!(labelled(dep1), name, "the old container has its name back");
    assert_eq!(
        labelled(dep2),
        "",
        "the failed deployment's container still runs"
    );
    assert!(util::http_get(port, "/").is_some_and(|b| b.contains("body=old")));
}
