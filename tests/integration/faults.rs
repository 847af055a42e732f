//! Promises under faults, against the fake control plane (which reproduces today's server's
//! NUL 500s) and real files: a poison report never blocks others, a full disk loses no task
//! and no report, a restart never reports a task twice with different outcomes.

use crate::agent::{chatty_build, statuses, wait_final};
use crate::fake_cp::{FakeCp, Fault, Version};
use crate::logs::{fail_the_route_until_the_spill_fails, numbers};
use crate::test_agent::{AgentBuilder, TestAgent, SECRET};
use crate::util::{self, temp_dir, test_name, RemoveContainers};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DEP_A: &str = "c0ffee00-1234-4abc-9def-0000000000a1";
const DEP_B: &str = "c0ffee00-1234-4abc-9def-0000000000b1";

fn builder_cp() -> FakeCp {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    cp
}

/// Starts the agent `node` describes and waits until it registered (again).
fn start_registered(cp: &FakeCp, node: &AgentBuilder) -> TestAgent {
    let before = cp.register_count();
    let agent = node.start();
    cp.wait_for("registered", Duration::from_secs(30), |cp| {
        cp.register_count() > before
    });
    agent
}

/// Output with a NUL byte and an escape: the report and the log reach today's server (which
/// refuses NUL) with the NUL replaced and the escape as it was. A report the server keeps rejecting holds no other task back, and
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
        why.contains("fatal: bad \u{fffd} byte \x1b[31mred\rover"),
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
    assert!(
        log.contains("fatal: bad \u{fffd} byte \x1b[31mred\rover"),
        "{log}"
    );
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
    /// `opts`: mount options, e.g. `size=4m,nr_inodes=400`.
    fn mount(name: &str, opts: &str) -> Option<Tmpfs> {
        let dir = temp_dir(name);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
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

    /// Takes every free inode with empty files; returns them.
    fn fill_inodes(&self) -> Vec<PathBuf> {
        let mut made = Vec::new();
        loop {
            let f = self.0.join(format!("inode-{}", made.len()));
            if std::fs::File::create(&f).is_err() {
                return made;
            }
            made.push(f);
        }
    }

    /// No free block and no free inode left; returns what to remove to undo it.
    fn fill_all(&self) -> Vec<PathBuf> {
        let mut made = vec![self.fill()];
        made.extend(self.fill_inodes());
        made
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        std::fs::remove_file(p).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn tmpfs_or_skip(name: &str, test: &str) -> Option<Tmpfs> {
    sized_tmpfs_or_skip(name, test, "size=4m,nr_inodes=400")
}

fn sized_tmpfs_or_skip(name: &str, test: &str, opts: &str) -> Option<Tmpfs> {
    let t = Tmpfs::mount(name, opts);
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

/// With DATA_DIR full, no task is taken (nor marked taken): it runs once space returns. A
/// task running when the disk fills up is reported (into the space its claim reserved), and
/// a restart after space returned does not report it again as interrupted.
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
    let node = TestAgent::builder("builder").cp(&cp).dir(&dir).envs(&env);
    let agent = start_registered(&cp, &node);
    let filler = fs.fill();
    let a = chatty_build(&cp, DEP_A);
    assert!(
        util::poll(20, || agent.log().contains("is full (0 KiB free")),
        "{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(1));
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
            .contains("git fetch exited 128"),
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
    let _agent = start_registered(&cp, &node);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(statuses(&cp, &b), ["running", "failed"], "B reported again");
    assert_eq!(statuses(&cp, &a), ["running", "failed"], "A reported again");
}

/// A DOCKER_CLI for the real engine whose `docker <command>` waits while the returned gate
/// file exists (created here).
fn gated_docker(dir: &Path, command: &str) -> (PathBuf, PathBuf) {
    let gate = dir.join("gate");
    let docker = dir.join("docker-gated");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = {command} ]; then while [ -e '{}' ]; do sleep 0.05; done; fi\nexec '{}' \"$@\"\n",
        gate.display(),
        crate::test_agent::which(&util::docker_cli())
    );
    std::fs::write(&docker, script).unwrap();
    util::sh(Command::new("chmod").arg("+x").arg(&docker));
    std::fs::write(&gate, "").unwrap();
    (docker, gate)
}

/// State a previous run left in `dir/data` (the agent's DATA_DIR in these tests).
struct Planted {
    tasks: PathBuf,
    outbox: PathBuf,
}

impl Planted {
    fn new(dir: &Path) -> Planted {
        let (tasks, outbox) = (dir.join("data/state/tasks"), dir.join("data/state/outbox"));
        std::fs::create_dir_all(&tasks).unwrap();
        std::fs::create_dir_all(&outbox).unwrap();
        Planted { tasks, outbox }
    }

    /// A journal entry; `at` in seconds since the epoch.
    fn entry(&self, id: &str, state: &str, at: u64) {
        let e = json!({"id": id, "type": "build", "deployment_id": "", "state": state, "at": at});
        std::fs::write(self.tasks.join(format!("{id}.json")), e.to_string()).unwrap();
    }

    /// A report queued in the outbox, `seq` its place.
    fn report(&self, seq: u64, id: &str, body: Value) {
        let r = json!({"task_id": id, "body": body});
        self.report_file(seq, id, &r.to_string());
    }

    /// A report file with this content (e.g. cut short by a crash).
    fn report_file(&self, seq: u64, id: &str, content: &str) {
        let path = self.outbox.join(format!("{seq:020}-{id}.json"));
        std::fs::write(path, content).unwrap();
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Planted state of a previous run: a running journal entry whose final report was queued
/// (or already delivered, leaving a tombstone). The restarted agent reports that outcome and
/// never `agent restarted during task`, also among thousands of journal entries.
#[test]
fn a_restart_never_reports_a_task_again_with_another_outcome() {
    let cp = builder_cp();
    let dir = temp_dir("faults-restart");
    let state = Planted::new(&dir);
    for i in 0..3000 {
        state.entry(&format!("done-{i:04}"), "done", 1_900_000_000);
    }
    let queued = "7e570000-0000-4000-8000-000000000001";
    let delivered = "7e570000-0000-4000-8000-000000000002";
    let interrupted = "7e570000-0000-4000-8000-000000000003";
    for id in [queued, delivered, interrupted] {
        state.entry(id, "running", 1_900_000_000);
    }
    let report = json!({"image_tag": "r/p:1", "status": "completed"});
    state.report(1, queued, report);
    std::fs::write(state.outbox.join(format!("{delivered}.sent")), "").unwrap();
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
    assert!(!state.outbox.join(format!("{delivered}.sent")).exists());
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
    // What a deploy with datasets leaves: the deployment's mount dir (its links).
    let mounts = dir.join("data/mounts").join(dep2);
    std::fs::create_dir_all(&mounts).unwrap();
    std::os::unix::fs::symlink("/nonexistent", mounts.join("ds")).unwrap();

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
    assert!(
        !mounts.exists(),
        "the failed deployment's mount dir is left"
    );
}

const PLANTED: &str = "7e570000-0000-4000-8000-0000000000a7";

/// Issue 16.1: a task whose reports the server refuses for ever (404): its running report is
/// tried and parked, its final report waits behind it. After a restart the agent still
/// polls and runs other tasks.
#[test]
fn a_refused_report_does_not_stop_polling_after_a_restart() {
    let cp = builder_cp();
    let dir = temp_dir("faults-parked");
    let state = Planted::new(&dir);
    state.entry(PLANTED, "done", now_secs());
    state.report(1, PLANTED, json!({"status": "running"}));
    state.report(2, PLANTED, json!({"status": "failed", "result": "x"}));
    let route = format!("/api/agent/tasks/{PLANTED}/complete");
    let not_found = Fault::Status(404, "text/plain", "404 page not found".into());
    cp.inject(&route, not_found, 1_000_000);
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&[("FAKE_GIT_EXIT", "128")])
        .start();
    let b = chatty_build(&cp, DEP_B);
    assert_eq!(wait_final(&cp, &b, 30)["status"], "failed");
    assert!(
        !cp.requests_to(&route).is_empty(),
        "the refused report was not tried"
    );
    assert!(statuses(&cp, PLANTED).is_empty());
}

/// Issue 16.7: the server refuses a task's reports 20 times in a row (15 × 500, 5 × 502)
/// while polls succeed: the report arrives soon after the fault ends, not 10 minutes later.
#[test]
fn a_report_refused_by_a_passing_fault_arrives_soon_after_it_ends() {
    let cp = builder_cp();
    let dir = temp_dir("faults-transient");
    let node = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_GIT_EXIT", "128");
    let _agent = start_registered(&cp, &node);
    // Every report route (polls are /api/agent/tasks?node_id=…).
    let internal = r#"{"error":"internal server error"}"#.to_string();
    cp.inject(
        "/api/agent/tasks/",
        Fault::Status(500, "application/json", internal),
        15,
    );
    let bad_gateway = "<html><body>502 Bad Gateway</body></html>".to_string();
    cp.inject(
        "/api/agent/tasks/",
        Fault::Status(502, "text/html", bad_gateway),
        5,
    );
    let a = chatty_build(&cp, DEP_A);
    assert_eq!(wait_final(&cp, &a, 90)["status"], "failed");
    assert_eq!(statuses(&cp, &a), ["running", "failed"]);
    let calls = cp.requests_to(&format!("/api/agent/tasks/{a}/complete"));
    let refused: Vec<_> = calls.iter().filter(|r| r.fault.is_some()).collect();
    assert_eq!(refused.len(), 20, "{}", cp.dump(40));
    let accepted = calls.iter().rfind(|r| r.status == Some(200));
    let after = accepted
        .unwrap()
        .at
        .duration_since(refused.last().unwrap().at)
        .unwrap();
    assert!(
        after < Duration::from_secs(60),
        "arrived {after:?} after the fault"
    );
}

/// Issue 16.13: a finished task whose reports the server has not taken yet keeps its journal
/// entry however far the clock jumps: polled again (it is still pending on the server), it
/// does not run a second time.
#[test]
fn a_clock_jump_never_prunes_a_task_whose_reports_are_undelivered() {
    let cp = builder_cp();
    let dir = temp_dir("faults-clock");
    let env = [("FAKE_GIT_EXIT", "128")];
    // A first run registers the node, so a pending task can be given to it.
    let node = TestAgent::builder("builder").cp(&cp).dir(&dir).envs(&env);
    drop(start_registered(&cp, &node));
    let node_id = cp.node_id_for_role("builder").unwrap();
    let t = cp.add_task(
        &node_id,
        "build",
        DEP_A,
        json!({"git_url": "https://git.example/a.git"}),
    );
    // It ran and finished "eight days ago" by the wall clock; neither report got through.
    let state = Planted::new(&dir);
    state.entry(&t, "done", now_secs() - 8 * 24 * 3600);
    state.report(1, &t, json!({"status": "running"}));
    state.report(2, &t, json!({"status": "failed", "result": "planted"}));
    let route = format!("/api/agent/tasks/{t}/complete");
    let internal = r#"{"error":"internal"}"#.to_string();
    cp.inject(
        &route,
        Fault::Status(500, "application/json", internal),
        1_000_000,
    );
    let agent = node.start();
    let polls = || cp.requests_to("/api/agent/tasks?node_id=").len();
    let before = polls();
    assert!(util::poll(20, || polls() > before + 10), "no polls");
    assert!(
        !agent.log().contains(&format!("task {t}: starting")),
        "{}",
        agent.log()
    );
    cp.clear_faults();
    wait_final(&cp, &t, 30);
    std::thread::sleep(Duration::from_secs(1));
    let results: Vec<Value> = cp
        .completions(&t)
        .into_iter()
        .map(|c| c["result"].clone())
        .collect();
    assert_eq!(statuses(&cp, &t), ["running", "failed"]);
    assert_eq!(results, [Value::Null, json!("planted")]);
}

/// Issue 16.4: a second agent on the same DATA_DIR exits with status 2, naming the first
/// one's pid; the first goes on unharmed.
#[test]
fn a_second_agent_on_the_same_data_dir_exits_2_naming_the_first() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-two");
    let first = start_registered(&cp, &TestAgent::builder("deploy").cp(&cp).dir(&dir));
    let mut second = TestAgent::builder("builder").cp(&cp).dir(&dir).start();
    let status = second.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", second.log());
    let want = format!(
        "DATA_DIR {} is in use by another muvee-agent (pid {})",
        dir.join("data").display(),
        first.child.id()
    );
    assert!(second.log().contains(&want), "{}", second.log());
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "myapp"}));
    assert_eq!(wait_final(&cp, &task, 20)["status"], "completed");
    assert!(
        cp.node_id_for_role("builder").is_none(),
        "the second one registered"
    );
}

/// Issue 16.8: what waits in DATA_DIR/state (a report with a task's result, journal entries)
/// is private to the agent's user, whatever its umask: directories 0700, files 0600.
#[test]
fn data_dir_state_is_private_to_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-private");
    let internal = r#"{"error":"internal"}"#.to_string();
    cp.inject(
        "/api/agent/tasks/",
        Fault::Status(500, "application/json", internal),
        1_000_000,
    );
    let umask_022 = ["sh", "-c", "umask 022 && exec \"$0\""];
    let _agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .wrapped_in(&umask_022)
        .start();
    let task = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "myapp"}));
    let state = dir.join("data/state");
    let queued = || {
        files(&state.join("outbox"))
            .iter()
            .filter(|(n, _)| n.ends_with(".json"))
            .count()
    };
    assert!(
        util::poll(20, || queued() == 2),
        "{:?}",
        files(&state.join("outbox"))
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut seen = 0;
    for sub in ["", "outbox", "tasks", "logs"] {
        let d = state.join(sub);
        assert_eq!(format!("{:o}", mode(&d)), "700", "{}", d.display());
        for (name, _) in files(&d) {
            let p = d.join(&name);
            if p.is_file() {
                assert_eq!(format!("{:o}", mode(&p)), "600", "{}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 4, "{seen} files");
    cp.clear_faults();
    assert_eq!(wait_final(&cp, &task, 30)["status"], "completed");
}

/// Issue 16.14: started on a DATA_DIR without a free block or inode, the agent runs:
/// registers, says so in its health report and in `check`, takes no task, and takes it once
/// space returns, by itself.
#[test]
fn a_full_data_dir_at_start_keeps_the_node_online_and_it_recovers() {
    let test = test_name!();
    let Some(fs) = tmpfs_or_skip("faults-full-start", test) else {
        return;
    };
    let cp = builder_cp();
    let dir = temp_dir("faults-full-start-agent");
    let data = fs.0.join("data");
    let env = [
        ("FAKE_GIT_EXIT", "128"),
        ("DATA_DIR", data.to_str().unwrap()),
    ];
    let node = TestAgent::builder("builder").cp(&cp).dir(&dir).envs(&env);
    drop(start_registered(&cp, &node));
    let fillers = fs.fill_all();
    let reported = cp.posted("/api/agent/health-report").len();
    let mut agent = start_registered(&cp, &node);
    cp.wait_for("a health report", Duration::from_secs(20), |cp| {
        cp.posted("/api/agent/health-report").len() > reported
    });
    let report = cp.posted("/api/agent/health-report")[reported].clone();
    let checks = report.as_array().cloned().unwrap_or_default();
    let check = checks
        .into_iter()
        .find(|c| c["name"] == "data_dir")
        .unwrap();
    assert_eq!(check["status"], "error", "{check}");
    let msg = check["message"].as_str().unwrap();
    assert!(
        msg.contains("is full") && msg.contains("no task is taken"),
        "{msg}"
    );
    let a = chatty_build(&cp, DEP_A);
    std::thread::sleep(Duration::from_secs(3));
    assert!(statuses(&cp, &a).is_empty(), "a task ran on a full disk");
    assert!(agent.wait_exit(Duration::ZERO).is_none(), "{}", agent.log());
    // `check` says the same.
    let out = Command::new(util::bin())
        .arg("check")
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", crate::test_agent::shims().display()),
        )
        .env("NODE_ROLE", "builder")
        .env("DATA_DIR", &data)
        .env("CONTROL_PLANE_URL", cp.url())
        .env("AGENT_SECRET", SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("error DATA_DIR: ") && text.contains("is full"),
        "{text}"
    );
    remove_all(&fillers);
    assert_eq!(wait_final(&cp, &a, 30)["status"], "failed");
    assert!(agent.log().contains("has space again"), "{}", agent.log());
}

/// Issue 16.5 (real engine): the disk fills up (no block, no inode) while a deploy runs. Its
/// `completed` report and its journal entry land in the space its claim reserved, so after
/// a kill -9 and a restart the agent neither reports it again nor removes its container.
#[test]
fn a_full_disk_never_undoes_a_reported_deploy() {
    let test = test_name!();
    if !util::require_docker(test) {
        return;
    }
    let Some(fs) = tmpfs_or_skip("faults-full-deploy", test) else {
        return;
    };
    crate::deployer::images();
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-full-deploy-agent");
    let prefix = format!("itf-full-{}", std::process::id());
    let name = format!("muvee-{prefix}");
    let _cleanup = RemoveContainers::named(&name);
    // `docker run` waits while the gate exists: the disk fills up while the task runs.
    let (docker, gate) = gated_docker(&dir, "run");
    let data = fs.0.join("data");
    let env = [
        ("DOCKER_CLI", docker.to_str().unwrap()),
        ("DATA_DIR", data.to_str().unwrap()),
        ("DEPLOY_HEALTH_TIMEOUT", "60s"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ];
    let node = TestAgent::builder("deploy").cp(&cp).dir(&dir).envs(&env);
    let agent = node.start();
    let dep = "d1000000-0000-4000-8000-0000000000f1";
    let p = json!({"image_tag": crate::deployer::APP, "deployment_id": dep, "project_id": "proj-full",
                   "domain_prefix": prefix, "container_port": 8080, "env_vars": {"BODY": "served"}});
    let task = cp.add_task_for_role("deploy", "deploy", dep, p);
    cp.wait_for("running", Duration::from_secs(30), |cp| {
        statuses(cp, &task) == ["running"]
    });
    let fillers = fs.fill_all();
    std::fs::remove_file(&gate).unwrap();
    let done = wait_final(&cp, &task, 120);
    assert_eq!(done["status"], "completed", "{done}\n{}", agent.log());
    let port = done["host_port"].as_u64().unwrap() as u16;
    let mut agent = agent;
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).unwrap();
    drop(agent);
    remove_all(&fillers);
    // Reconcile runs before the first registration.
    let agent = start_registered(&cp, &node);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        statuses(&cp, &task),
        ["running", "completed"],
        "{}",
        agent.log()
    );
    assert!(
        util::http_get(port, "/").is_some_and(|b| b.contains("body=served")),
        "the reported container is gone\n{}",
        agent.log()
    );
}

/// DATA_DIR (a 4 MB tmpfs) fills up under the log spill while the log route fails and a build
/// prints 16.8 MB: every line is in the log or counted by a marker naming the full disk, the
/// agent warns once (not once per line) and the shipper lives on to drain the rest.
#[test]
fn a_full_disk_under_the_log_spill_counts_the_lines_it_drops() {
    // Larger than the shipper's 8 MiB memory cap, so the spill holds lines before the disk
    // fills: those must arrive too, whatever the printing and polling speeds.
    let opts = "size=12m,nr_inodes=400";
    let Some(fs) = sized_tmpfs_or_skip("faults-spill", test_name!(), opts) else {
        return;
    };
    let cp = builder_cp();
    let dir = temp_dir("faults-spill-agent");
    let data = fs.0.join("data");
    let start = || {
        let env = [
            ("FAKE_GIT_LINES", "600000"),
            ("FAKE_GIT_EXIT", "128"),
            ("DATA_DIR", data.to_str().unwrap()),
        ];
        let agent = TestAgent::builder("builder")
            .cp(&cp)
            .dir(&dir)
            .envs(&env)
            .start();
        (agent, chatty_build(&cp, DEP_A))
    };
    let full = "No space left on device";
    let log = fail_the_route_until_the_spill_fails(&cp, start, DEP_A, 600_000, full);
    let got = numbers(&log).len();
    assert!(
        got > 400_000,
        "the spill was drained too: {got} lines delivered"
    );
    assert!(files(&data.join("state/logs")).is_empty());
}

/// An image only the registry has: a deploy of it pulls.
fn registry_only(name: &str) -> String {
    let reg = util::registry();
    let tag = format!("{}/muvee-it-{name}-{}:1", reg.addr, std::process::id());
    let login = util::registry_login();
    util::sh(Command::new(util::docker_cli()).args(["tag", crate::deployer::APP, &tag]));
    util::sh(
        Command::new(util::docker_cli())
            .env("DOCKER_CONFIG", &login)
            .args(["push", "-q", &tag]),
    );
    util::sh(Command::new(util::docker_cli()).args(["rmi", &tag]));
    tag
}

/// Real engine, MAX_CONCURRENT_TASKS=2: app A's deploy waits 25 s for an image that never
/// answers, holding A's lock, while A's restart and pause queue behind it. Neither holds a
/// slot while it waits: B's deploy is polled and served meanwhile, and A's next deploy pulls
/// its image and syncs its dataset before it waits for A's lock.
#[test]
fn a_busy_app_holds_back_no_other_apps_work() {
    if !util::require_docker(test_name!()) {
        return;
    }
    crate::deployer::images();
    let image = registry_only("busy");
    let reg = util::registry();
    let cp = FakeCp::start(Version::Today, SECRET);
    for (k, v) in [
        ("registry_addr", reg.addr.as_str()),
        ("registry_user", reg.user.as_str()),
        ("registry_password", reg.password.as_str()),
    ] {
        cp.set_config(k, v);
    }
    let share = temp_dir("faults-busy-share");
    std::fs::create_dir_all(share.join("s")).unwrap();
    std::fs::write(share.join("s/file.txt"), "busy-set\n").unwrap();
    cp.set_config("dataset_nfs_base_path", share.to_str().unwrap());
    let dir = temp_dir("faults-busy");
    let (a, b) = (
        format!("itf-busya-{}", std::process::id()),
        format!("itf-busyb-{}", std::process::id()),
    );
    let _cleanup = (RemoveContainers::named(&a), RemoveContainers::named(&b));
    let env = [
        ("MAX_CONCURRENT_TASKS", "2"),
        ("DEPLOY_HEALTH_TIMEOUT", "25s"),
        ("DEPLOY_DRAIN", "0s"),
    ];
    let agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .real_docker()
        .start();
    let deploy = |prefix: &str, dep: &str, image: &str, datasets: serde_json::Value| {
        let p = json!({"image_tag": image, "deployment_id": dep, "project_id": "proj-busy",
                       "domain_prefix": prefix, "container_port": 8080, "datasets": datasets});
        cp.add_task_for_role("deploy", "deploy", dep, p)
    };
    let (dep_a1, dep_a2, dep_b) = (
        "d2000000-0000-4000-8000-000000000001",
        "d2000000-0000-4000-8000-000000000002",
        "d2000000-0000-4000-8000-000000000003",
    );
    let a1 = deploy(&a, dep_a1, crate::deployer::IDLE, json!(null));
    let waiting = |dep: &str| {
        let f = format!("label=muvee.deployment_id={dep}");
        let out = util::docker(&["ps", "-q", "--filter", &f], &[]);
        !out.stdout.is_empty()
    };
    assert!(util::poll(60, || waiting(dep_a1)), "{}", agent.log());
    let lifecycle: Vec<String> = ["restart", "pause"]
        .iter()
        .map(|t| cp.add_task_for_role("deploy", t, "", json!({"domain_prefix": a})))
        .collect();
    let set = json!([{"id": format!("busy-{}", std::process::id()), "name": "set",
                      "nfs_path": "s", "version": 1, "mount_mode": "dependency"}]);
    let a2 = deploy(&a, dep_a2, &image, set);
    let b_task = deploy(&b, dep_b, crate::deployer::APP, json!(null));
    let final_b = wait_final(&cp, &b_task, 60);
    assert_eq!(final_b["status"], "completed", "{final_b}");
    assert_eq!(statuses(&cp, &a1), ["running"], "B waited for A's deploy");
    let a2_log = || String::from_utf8(cp.logs(dep_a2)).unwrap();
    let prepared =
        |l: &str| l.contains(&format!("Pulling {image}")) && l.contains("copying version 1");
    assert!(util::poll(30, || prepared(&a2_log())), "{}", a2_log());
    assert_eq!(
        statuses(&cp, &a1),
        ["running"],
        "A's next deploy pulled and synced only after A's lock was free"
    );
    assert_eq!(wait_final(&cp, &a1, 60)["status"], "failed");
    for t in &lifecycle {
        assert_eq!(wait_final(&cp, t, 60)["status"], "completed");
    }
    assert_eq!(wait_final(&cp, &a2, 60)["status"], "completed");
}

/// Two tasks of an earlier run whose reports get no answer (`fault` on their routes) and a
/// restart: the agent polls all the same, and a new task's reports go out at once beside
/// them. Returns the two stuck tasks and when the agent started.
fn reports_without_answer_after_a_restart(
    fault: Fault,
    name: &str,
) -> (FakeCp, TestAgent, Vec<String>, Instant) {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir(name);
    let node = TestAgent::builder("deploy").cp(&cp).dir(&dir);
    drop(start_registered(&cp, &node));
    let node_id = cp.node_id_for_role("deploy").unwrap();
    let state = Planted::new(&dir);
    let mut stuck = Vec::new();
    for n in 0..2 {
        let x = cp.add_task(&node_id, "cleanup", "", json!({"domain_prefix": "myapp"}));
        state.entry(&x, "done", now_secs());
        state.report(2 * n + 1, &x, json!({"status": "running"}));
        state.report(2 * n + 2, &x, json!({"status": "completed"}));
        let route = format!("/api/agent/tasks/{x}/complete");
        cp.inject(&route, fault.clone(), 1_000_000);
        stuck.push(x);
    }
    let polls = |cp: &FakeCp| cp.requests_to("/api/agent/tasks?node_id=").len();
    let before = polls(&cp);
    let started = Instant::now();
    let agent = start_registered(&cp, &node);
    // A first try of each old task's report (a hang ends at the client's 20 s timeout).
    cp.wait_for("a poll after the restart", Duration::from_secs(45), |cp| {
        polls(cp) > before
    });
    let b = cp.add_task_for_role("deploy", "cleanup", "", json!({"domain_prefix": "other"}));
    wait_final(&cp, &b, 10);
    assert_eq!(statuses(&cp, &b), ["running", "completed"]);
    for x in &stuck {
        assert!(statuses(&cp, x).is_empty(), "{x} got through the fault");
    }
    (cp, agent, stuck, started)
}

/// Issue 16 follow-up (HIGH): reports whose requests are reset hold back neither polling
/// after a restart nor any other task's reports. Each is retried on its own growing delay
/// (not at every poll, a warning each time) and arrives once the fault ends.
#[test]
fn reset_reports_hold_back_no_other_task_nor_polling_after_a_restart() {
    let (cp, agent, stuck, started) =
        reports_without_answer_after_a_restart(Fault::Reset, "faults-reset");
    std::thread::sleep(
        (started + Duration::from_secs(15)).saturating_duration_since(Instant::now()),
    );
    let route = format!("/api/agent/tasks/{}/complete", stuck[0]);
    let tries = cp.requests_to(&route).len();
    // 1, 2, 4, 8 s apart: 5 tries in 15 s (a report retried at every poll: about 40).
    assert!((1..=8).contains(&tries), "{tries} tries in 15 s");
    let warned = format!("running report of task {} got no answer", stuck[0]);
    assert!(agent.log().matches(&warned).count() <= 2, "{}", agent.log());
    cp.clear_faults();
    for x in &stuck {
        wait_final(&cp, x, 45);
        assert_eq!(statuses(&cp, x), ["running", "completed"]);
    }
}

/// The same with requests that hang until the agent's 20 s timeout: the new task's reports
/// go out while both stuck reports wait for an answer.
#[test]
fn hanging_reports_hold_back_no_other_task_nor_polling_after_a_restart() {
    let hang = Fault::Hang(Duration::from_secs(600));
    reports_without_answer_after_a_restart(hang, "faults-hang");
}

/// Issue 16 follow-up (HIGH, real engine): a `runtime_logs` result three times the 64 KiB
/// reserved for its report, on a disk that is full when the task ends, the report refused
/// and the agent stopped before the fault ends. The report written is the one sent: cut to
/// the reserve, with a marker; after the restart exactly one final report arrives.
#[test]
fn a_final_report_too_big_for_a_full_disk_is_cut_to_its_reserve_and_sent_once() {
    let test = test_name!();
    if !util::require_docker(test) {
        return;
    }
    let Some(fs) = tmpfs_or_skip("faults-big-final", test) else {
        return;
    };
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-big-final-agent");
    let prefix = format!("itf-bigfinal-{}", std::process::id());
    let name = format!("muvee-{prefix}");
    let _cleanup = RemoveContainers::named(&name);
    let line = "a line the app printed, long enough to count";
    let app = format!("yes '{line}' | head -n 4000; exec sleep 3600");
    let run = [
        "run",
        "-d",
        "--name",
        &name,
        &util::base_image(),
        "sh",
        "-c",
        &app,
    ];
    assert!(util::docker(&run, &[]).status.success());
    let printed = || util::docker(&["logs", &name], &[]).stdout.len();
    assert!(util::poll(30, || printed() == 4000 * (line.len() + 1)));
    // `docker logs` waits while the gate exists: the disk fills up while the task runs.
    let (docker, gate) = gated_docker(&dir, "logs");
    let data = fs.0.join("data");
    let env = [
        ("DOCKER_CLI", docker.to_str().unwrap()),
        ("DATA_DIR", data.to_str().unwrap()),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ];
    let node = TestAgent::builder("deploy").cp(&cp).dir(&dir).envs(&env);
    let mut agent = start_registered(&cp, &node);
    let p = json!({"domain_prefix": prefix});
    let task = cp.add_task_for_role("deploy", "runtime_logs", "", p);
    cp.wait_for("running", Duration::from_secs(30), |cp| {
        statuses(cp, &task) == ["running"]
    });
    let route = format!("/api/agent/tasks/{task}/complete");
    let page = "<html>503 Service Unavailable</html>".to_string();
    cp.inject(&route, Fault::Status(503, "text/html", page), 1_000_000);
    let fillers = fs.fill_all();
    std::fs::remove_file(&gate).unwrap();
    cp.wait_for("a refused final report", Duration::from_secs(60), |cp| {
        cp.requests_to(&route).iter().any(|r| r.fault.is_some())
    });
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(60)).is_some());
    let stopped = agent.log();
    drop(agent);
    remove_all(&fillers);
    cp.clear_faults();
    let agent = start_registered(&cp, &node);
    let done = wait_final(&cp, &task, 30);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        statuses(&cp, &task),
        ["running", "completed"],
        "{}",
        agent.log()
    );
    let result = done["result"].as_str().unwrap();
    assert!(result.starts_with(&format!("{line}\n{line}\n")), "{result}");
    assert!(
        result.ends_with("[cut by muvee-agent: DATA_DIR was full when the task ended]\n"),
        "{result}"
    );
    assert!(
        result.len() > 60 << 10 && result.len() < 64 << 10,
        "{}",
        result.len()
    );
    // The stop said what was true: the report stayed queued, none was unwritten.
    assert!(
        stopped.contains("1 undelivered report(s) stay queued")
            && !stopped.contains("cannot write"),
        "{stopped}"
    );
}

/// Issue 16 follow-up: a queued report file cut short (a crash on a filesystem without
/// ordered data) does not lose its task's outcome: the file names the task, which is
/// reported `failed` with the reason, unless a final report of it is still queued.
#[test]
fn a_damaged_report_file_becomes_a_failed_report_of_its_task() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-damaged");
    let node = TestAgent::builder("deploy").cp(&cp).dir(&dir);
    drop(start_registered(&cp, &node));
    let node_id = cp.node_id_for_role("deploy").unwrap();
    let [x, y] =
        ["a", "b"].map(|p| cp.add_task(&node_id, "cleanup", "", json!({"domain_prefix": p})));
    let state = Planted::new(&dir);
    // x's final report was cut short; y's running report was, its final report was not.
    state.entry(&x, "done", now_secs());
    state.entry(&y, "done", now_secs());
    state.report_file(1, &x, "");
    state.report_file(2, &y, r#"{"task_id":"#);
    state.report(3, &y, json!({"status": "completed"}));
    let agent = start_registered(&cp, &node);
    let final_x = wait_final(&cp, &x, 20);
    assert_eq!(final_x["status"], "failed", "{}", agent.log());
    let why = final_x["result"].as_str().unwrap();
    assert!(
        why.contains("queued report of this task was damaged"),
        "{why}"
    );
    wait_final(&cp, &y, 20);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(statuses(&cp, &x), ["failed"]);
    assert_eq!(statuses(&cp, &y), ["completed"]);
}

/// Issue 16 follow-up: two agents started at the same instant. The winner holds the lock
/// but has not written its pid yet (here: this test process holds it), and agent.pid still
/// names an agent killed earlier: the loser names the holder the kernel lists, never the
/// stale pid.
#[test]
fn a_second_agent_names_the_lock_holder_not_a_stale_pid_file() {
    use std::os::unix::io::AsRawFd;
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-stale-pid");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("state")).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let stale = gone.id();
    gone.wait().unwrap();
    std::fs::write(data.join("state/agent.pid"), format!("{stale}\n")).unwrap();
    let held = std::fs::File::open(&data).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let r = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0);
    let mut agent = TestAgent::builder("deploy").cp(&cp).dir(&dir).start();
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", agent.log());
    let want = format!("in use by another muvee-agent (pid {})", std::process::id());
    assert!(agent.log().contains(&want), "{}", agent.log());
    drop(held);
}

/// Issue 16 follow-up: symlinks planted in DATA_DIR/state are never followed: the outbox
/// directory pointing elsewhere is replaced (the other directory keeps its mode and gets no
/// report), and a temp name or a reserve pointing at a file leaves that file as it was.
#[test]
fn symlinks_planted_in_the_state_are_never_followed() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("faults-symlinks");
    let node = TestAgent::builder("deploy").cp(&cp).dir(&dir);
    drop(start_registered(&cp, &node));
    let node_id = cp.node_id_for_role("deploy").unwrap();
    let task = cp.add_task(&node_id, "cleanup", "", json!({"domain_prefix": "myapp"}));
    let state = dir.join("data/state");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("keep"), "keep").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    let victims = [dir.join("victim1"), dir.join("victim2")];
    for v in &victims {
        std::fs::write(v, "precious").unwrap();
    }
    std::fs::remove_dir_all(state.join("outbox")).unwrap();
    symlink(&elsewhere, state.join("outbox")).unwrap();
    symlink(&victims[0], state.join("agent.tmp")).unwrap();
    symlink(&victims[1], state.join(format!("tasks/{task}.reserve"))).unwrap();
    let agent = start_registered(&cp, &node);
    assert_eq!(wait_final(&cp, &task, 30)["status"], "completed");
    assert_eq!(format!("{:o}", mode(&elsewhere)), "755");
    assert_eq!(files(&elsewhere), [("keep".to_string(), 4)]);
    for v in &victims {
        assert_eq!(std::fs::read_to_string(v).unwrap(), "precious");
    }
    let outbox = std::fs::symlink_metadata(state.join("outbox")).unwrap();
    assert!(outbox.is_dir(), "{}", agent.log());
}

/// Issue 16 follow-up: with umask 000 and DATA_DIR full at start (no state directory could
/// be made then), what is made once space returns is private all the same: the log spill
/// directory and file, the build owners' directory and lock.
#[test]
fn state_made_after_a_full_start_is_private_under_umask_000() {
    use std::os::unix::fs::PermissionsExt;
    let test = test_name!();
    let Some(fs) = sized_tmpfs_or_skip("faults-umask", test, "size=64m,nr_inodes=400") else {
        return;
    };
    let cp = builder_cp();
    let dir = temp_dir("faults-umask-agent");
    let data = fs.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let fillers = fs.fill_all();
    let env = [
        ("FAKE_GIT_LINES", "450000"),
        ("FAKE_GIT_EXIT", "128"),
        ("DATA_DIR", data.to_str().unwrap()),
    ];
    let umask_000 = ["sh", "-c", "umask 000 && exec \"$0\""];
    let node = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .wrapped_in(&umask_000);
    let agent = start_registered(&cp, &node);
    remove_all(&fillers);
    // The log route stalls while the build prints 12 MB: the backlog spills to disk.
    cp.inject("/api/deployments/", Fault::Hang(Duration::from_secs(12)), 1);
    let task = chatty_build(&cp, DEP_A);
    let mode = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.permissions().mode() & 0o777);
    let logs = data.join("state/logs");
    let mut spill = None;
    let spilled = util::poll(60, || {
        let found = files(&logs)
            .into_iter()
            .find(|(n, _)| n.ends_with(".spill"));
        spill = found.and_then(|(n, _)| mode(&logs.join(n)).ok());
        spill.is_some()
    });
    assert!(spilled, "{}", agent.log());
    assert_eq!(spill.map(|m| format!("{m:o}")).unwrap(), "600");
    let owners = data.join("state/build-owners");
    for d in [
        &data.join("state"),
        &logs,
        &owners,
        &data.join("state/tasks"),
    ] {
        assert_eq!(format!("{:o}", mode(d).unwrap()), "700", "{}", d.display());
    }
    for (lock, _) in files(&owners) {
        assert_eq!(
            format!("{:o}", mode(&owners.join(&lock)).unwrap()),
            "600",
            "{lock}"
        );
    }
    assert_eq!(wait_final(&cp, &task, 180)["status"], "failed");
}
