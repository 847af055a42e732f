//! Promises the fault campaign (examples/chaos) found broken, each replayed against the fake
//! control plane's fault layer (and the real engine where a container is involved).

use crate::agent::{chatty_build, wait_final};
use crate::fake_cp::{FakeCp, Fault, Version};
use crate::test_agent::{TestAgent, SECRET};
use crate::util::{self, temp_dir};
use std::time::Duration;

fn builder_cp() -> FakeCp {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    cp
}

const POLLS: &str = "/api/agent/tasks?";

/// polls-and-takes: a node-metrics route that never answers (beyond the client's 20 s
/// timeout) does not stop polling, nor taking tasks.
#[test]
fn a_stalled_node_metrics_route_never_stops_polling() {
    let cp = builder_cp();
    cp.inject(
        "/api/agent/node-metrics",
        Fault::Hang(Duration::from_secs(60)),
        1_000,
    );
    let dir = temp_dir("campaign-metrics");
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_GIT_EXIT", "128")
        .start();
    cp.wait_for("a stalled metrics post", Duration::from_secs(30), |cp| {
        !cp.requests_to("/api/agent/node-metrics").is_empty()
    });
    // Two heartbeats (2 s) later, polls (every 200 ms) still go on.
    std::thread::sleep(Duration::from_secs(1));
    let before = cp.requests_to(POLLS).len();
    std::thread::sleep(Duration::from_secs(5));
    let polled = cp.requests_to(POLLS).len() - before;
    assert!(polled >= 5, "{polled} polls in 5 s\n{}", agent.log());
    let task = chatty_build(&cp, "c0ffee00-1234-4abc-9def-0000000000c1");
    assert_eq!(wait_final(&cp, &task, 10)["status"], "failed");
}

/// logs-delivered: one 404 that is not the March server's plain page (here a JSON error)
/// is retried like a 5xx: every line of the build arrives.
#[test]
fn a_transient_404_on_the_log_route_loses_no_line() {
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000c2";
    cp.inject(
        &format!("/api/deployments/{dep}/logs"),
        Fault::status(404),
        1,
    );
    let dir = temp_dir("campaign-log404");
    let env = [("FAKE_GIT_LINES", "2000"), ("FAKE_GIT_EXIT", "128")];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 60)["status"], "failed");
    // A 404 after the task ended hands the lines to the late-log queue: they may follow
    // the final report.
    crate::logs::assert_every_line_once(&cp, dep, 2000, 60);
    drop(agent);
    let refused = cp.requests_to(&format!("/api/deployments/{dep}/logs"));
    assert_eq!(refused[0].status, Some(404), "the fault was not hit");
}

/// minor: a journal that cannot record tasks (its directory is gone, the disk has room) is
/// logged once, not at every poll of every pending task; once it can again, tasks run.
#[test]
fn a_failing_journal_is_logged_once_per_change() {
    let cp = builder_cp();
    let dir = temp_dir("campaign-journal");
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_GIT_EXIT", "128")
        .start();
    cp.wait_for("a poll", Duration::from_secs(30), |cp| {
        !cp.requests_to(POLLS).is_empty()
    });
    let tasks = dir.join("data/state/tasks");
    std::fs::remove_dir_all(&tasks).unwrap();
    std::fs::write(&tasks, b"not a directory").unwrap();
    let a = chatty_build(&cp, "c0ffee00-1234-4abc-9def-0000000000c3");
    let b = chatty_build(&cp, "c0ffee00-1234-4abc-9def-0000000000c4");
    let errors = || {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("in the journal"))
            .count()
    };
    assert!(util::poll(10, || errors() > 0), "{}", agent.log());
    let before = cp.requests_to(POLLS).len();
    std::thread::sleep(Duration::from_secs(3));
    assert!(cp.requests_to(POLLS).len() > before + 3, "polling stopped");
    assert_eq!(errors(), 1, "{}", agent.log());
    std::fs::remove_file(&tasks).unwrap();
    std::fs::create_dir(&tasks).unwrap();
    assert_eq!(wait_final(&cp, &a, 30)["status"], "failed");
    assert_eq!(wait_final(&cp, &b, 30)["status"], "failed");
    assert!(agent.log().contains("the journal records tasks again"));
}

/// A task the journal cannot record (here its file cannot be written) is left for a later
/// poll, and so are the tasks queued after it: none of them runs first.
#[test]
fn a_task_the_journal_cannot_record_holds_the_tasks_after_it() {
    let cp = builder_cp();
    let dir = temp_dir("campaign-journal-one");
    cp.inject(POLLS, Fault::status(500), 1_000_000);
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .env("FAKE_GIT_EXIT", "128")
        .start();
    let a = chatty_build(&cp, "c0ffee00-1234-4abc-9def-0000000000c5");
    let b = chatty_build(&cp, "c0ffee00-1234-4abc-9def-0000000000c6");
    // A's journal entry is written through `<id>.tmp`: a directory there refuses it.
    let blocker = dir.join(format!("data/state/tasks/{a}.tmp"));
    std::fs::create_dir_all(&blocker).unwrap();
    cp.clear_faults();
    let refused = || agent.log().contains(&format!("cannot record task {a}"));
    assert!(util::poll(20, refused), "{}", agent.log());
    let polls = cp.requests_to(POLLS).len();
    assert!(util::poll(10, || cp.requests_to(POLLS).len() > polls + 2));
    let statuses = |t: &str| crate::agent::statuses(&cp, t);
    assert!(
        statuses(&b).is_empty(),
        "B ran before A: {:?}",
        statuses(&b)
    );
    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(wait_final(&cp, &a, 30)["status"], "failed");
    assert_eq!(wait_final(&cp, &b, 30)["status"], "failed");
}

/// Whether `pid` runs (a zombie, reparented to the test as subreaper, does not).
fn alive(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    !stat.is_empty() && !state.starts_with('Z') && !state.starts_with('X')
}

/// nothing-left: the periodic reports' commands (here every docker call hangs for 60 s)
/// are killed at SIGTERM; none outlives the agent.
#[test]
fn no_child_of_the_reports_outlives_the_agent() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let dir = temp_dir("campaign-children");
    let node = dir.file_name().unwrap().to_str().unwrap().to_string();
    let row = format!("a1\tmuvee-app\trunning\tapp\td1\t8080\t{node}\t");
    let mut agent = TestAgent::builder("deploy")
        .cp(&cp)
        .dir(&dir)
        .env("HEARTBEAT_INTERVAL", "1s")
        .env("FAKE_DOCKER_OUT", &row)
        .env("FAKE_DOCKER_SLEEP", "60")
        .start();
    let pids = || std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
    assert!(
        util::poll(30, || pids().lines().any(alive)),
        "no report ran docker\n{}",
        agent.log()
    );
    agent.signal(libc::SIGTERM);
    let exit = agent.wait_exit(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| s.success()), "{}", agent.log());
    std::thread::sleep(Duration::from_millis(500));
    let left: Vec<String> = pids()
        .lines()
        .filter(|p| alive(p))
        .map(String::from)
        .collect();
    assert!(
        left.is_empty(),
        "still running: {left:?}\n{}",
        agent.calls().join("\n")
    );
}

/// A deploy agent on the real engine with DEPLOY_DRAIN 1s, and the deploys of one app.
struct DrainBed {
    cp: FakeCp,
    agent: TestAgent,
    prefix: String,
    _cleanup: util::RemoveContainers,
}

/// The line a deploy prints once its new container answers.
const HEALTHY: &str = "is healthy, listening on host port";

impl DrainBed {
    fn start(tag: &str, env: &[(&str, &str)]) -> DrainBed {
        crate::deployer::images();
        let cp = FakeCp::start(Version::Today, SECRET);
        let prefix = format!("itc-{tag}-{}", std::process::id());
        let _cleanup = util::RemoveContainers::named(&format!("muvee-{prefix}"));
        let agent = TestAgent::builder("deploy")
            .cp(&cp)
            .dir(&temp_dir(&format!("campaign-{tag}")))
            .real_docker()
            .env("DEPLOY_DRAIN", "1s")
            .envs(env)
            .start();
        DrainBed {
            cp,
            agent,
            prefix,
            _cleanup,
        }
    }

    /// Queues a deploy whose app answers `body=<body>`; returns the task id.
    fn deploy(&self, dep: &str, body: &str) -> String {
        self.deploy_image(crate::deployer::APP, dep, body)
    }

    fn deploy_image(&self, image: &str, dep: &str, body: &str) -> String {
        let p = serde_json::json!({"image_tag": image, "deployment_id": dep,
            "project_id": "proj-drain", "domain_prefix": self.prefix, "container_port": 8080,
            "env_vars": {"BODY": body}});
        self.cp.add_task_for_role("deploy", "deploy", dep, p)
    }

    /// Queues a deploy and waits until its new container is healthy (its report may be
    /// refused).
    fn deploy_healthy(&self, dep: &str, body: &str) -> String {
        let before = self.agent.log().matches(HEALTHY).count();
        let task = self.deploy(dep, body);
        let log = || self.agent.log();
        assert!(
            util::poll(120, || log().matches(HEALTHY).count() > before),
            "{}",
            log()
        );
        task
    }

    /// The port a completed deploy reported.
    fn completed_port(&self, task: &str) -> u16 {
        self.completed_port_within(task, 120)
    }

    fn completed_port_within(&self, task: &str, secs: u64) -> u16 {
        let r = wait_final(&self.cp, task, secs);
        assert_eq!(r["status"], "completed", "{r}\n{}", self.agent.log());
        r["host_port"].as_u64().unwrap() as u16
    }
}

fn answers(port: u16, body: &str) -> bool {
    util::http_get(port, "/").is_some_and(|b| b.contains(&format!("body={body}")))
}

/// app-keeps-answering (real engine): while the complete route answers 502, the control
/// plane still routes to the old container's port: it keeps serving past DEPLOY_DRAIN, and
/// is removed DEPLOY_DRAIN after the completed report was accepted.
#[test]
fn the_old_container_serves_until_the_new_port_was_reported() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let bed = DrainBed::start("drain", &[]);
    let first = bed.deploy("d2000000-0000-4000-8000-000000000001", "old");
    let old_port = bed.completed_port(&first);
    // Every report is refused (502) from now on, until the fault is cleared.
    bed.cp
        .inject("/api/agent/tasks/", Fault::status(502), 1_000_000);
    let second = bed.deploy_healthy("d2000000-0000-4000-8000-000000000002", "new");
    // Well past DEPLOY_DRAIN: the old port still answers.
    std::thread::sleep(Duration::from_secs(6));
    let log = || bed.agent.log();
    assert!(
        answers(old_port, "old"),
        "the old container was retired\n{}",
        log()
    );
    bed.cp.clear_faults();
    bed.completed_port(&second);
    assert!(
        util::poll(30, || !answers(old_port, "old")),
        "the old container outlived the report\n{}",
        log()
    );
}

/// app-keeps-answering (campaign seed 1201): a newer deploy of the app while the previous
/// deploy's report is still refused must not retire what the control plane routes to; the
/// newer deploy retires both once its own report is taken.
#[test]
fn a_newer_deploy_keeps_the_routed_container_until_its_own_report_is_taken() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let bed = DrainBed::start("takeover", &[]);
    let first = bed.deploy("d3000000-0000-4000-8000-000000000001", "one");
    let routed = bed.completed_port(&first);
    bed.cp
        .inject("/api/agent/tasks/", Fault::status(502), 1_000_000);
    let second = bed.deploy_healthy("d3000000-0000-4000-8000-000000000002", "two");
    let third = bed.deploy_healthy("d3000000-0000-4000-8000-000000000003", "three");
    // Past DEPLOY_DRAIN after the takeover: the routed port still answers.
    std::thread::sleep(Duration::from_secs(4));
    let log = || bed.agent.log();
    assert!(
        answers(routed, "one"),
        "the routed container was retired\n{}",
        log()
    );
    bed.cp.clear_faults();
    bed.completed_port(&second);
    let new_port = bed.completed_port(&third);
    // The control plane routes by the last report it took: the second's went first.
    let taken = |task: &str| {
        let reqs = bed
            .cp
            .requests_to(&format!("/api/agent/tasks/{task}/complete"));
        let ok = reqs
            .iter()
            .filter(|r| r.json().is_some_and(|b| b["status"] == "completed"))
            .find(|r| r.status == Some(200) && r.fault.is_none());
        ok.map(|r| r.at).expect("a taken report")
    };
    assert!(taken(&second) < taken(&third), "{}", log());
    assert!(
        util::poll(30, || !answers(routed, "one")),
        "the first container outlived the third deploy's report\n{}",
        log()
    );
    assert!(answers(new_port, "three"), "{}", log());
    // The second container, set aside by the third deploy, went with the first.
    let only_current =
        || crate::deployer::containers(&bed.prefix) == [format!("muvee-{}", bed.prefix)];
    assert!(util::poll(30, only_current), "{}", log());
}

/// app-keeps-answering (campaign seed 1201): the control plane routes by the last deploy
/// report it took, so a late report of an older deploy moves the route back to a retired
/// port. Container statuses (each app's current port) re-route it, and they go out as soon
/// as a report was taken, not a heartbeat later.
#[test]
fn container_statuses_follow_each_taken_report_at_once() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let bed = DrainBed::start("statuses", &[("HEARTBEAT_INTERVAL", "10m")]);
    let task = bed.deploy("d4000000-0000-4000-8000-000000000001", "one");
    let port = bed.completed_port(&task);
    let routed = || {
        let posted = bed.cp.posted("/api/agent/container-statuses");
        posted
            .iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .any(|s| s["domain_prefix"] == bed.prefix.as_str() && s["host_port"] == u64::from(port))
    };
    assert!(util::poll(10, routed), "{}", bed.agent.log());
}

/// app-keeps-answering (campaign seed 29): a replacement names its new container after the
/// app before it is healthy; statuses sent meanwhile would route today's server to it. A
/// new container that never answers is never in a status.
#[test]
fn statuses_never_carry_a_container_that_is_not_healthy_yet() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let env = [
        ("HEARTBEAT_INTERVAL", "1s"),
        ("DEPLOY_HEALTH_TIMEOUT", "10s"),
    ];
    let bed = DrainBed::start("unhealthy", &env);
    let first = bed.deploy("d5000000-0000-4000-8000-000000000001", "one");
    let port = bed.completed_port(&first);
    let idle = crate::deployer::IDLE;
    let second = bed.deploy_image(idle, "d5000000-0000-4000-8000-000000000002", "two");
    let r = wait_final(&bed.cp, &second, 60);
    assert_eq!(r["status"], "failed", "{r}");
    let posted = bed.cp.posted("/api/agent/container-statuses");
    let ours: Vec<serde_json::Value> = posted
        .iter()
        .flat_map(|b| b.as_array().cloned().unwrap_or_default())
        .filter(|s| s["domain_prefix"] == bed.prefix.as_str())
        .collect();
    // Statuses went out every second meanwhile (the app left out while it was replaced).
    assert!(posted.len() >= 3, "{posted:?}\n{}", bed.agent.log());
    let elsewhere: Vec<_> = ours
        .iter()
        .filter(|s| s["host_port"] != u64::from(port))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "routed to {port}: {elsewhere:?}\n{}",
        bed.agent.log()
    );
}

/// completed-is-real (campaign seed 1202): tasks of one app claimed together wait for its
/// lock; a pause queued before a deploy must pause the old version, not the new one: an
/// app's tasks change it in the order the control plane gave them, whoever wakes first.
#[test]
fn an_apps_tasks_change_it_in_the_order_they_were_queued() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let bed = DrainBed::start("order", &[("DEPLOY_HEALTH_TIMEOUT", "4s")]);
    let first = bed.deploy("d6000000-0000-4000-8000-000000000001", "one");
    bed.completed_port(&first);
    // A deploy that never turns healthy holds the app's lock while the next two queue.
    let idle = crate::deployer::IDLE;
    let holder = bed.deploy_image(idle, "d6000000-0000-4000-8000-000000000002", "idle");
    let prefix = serde_json::json!({"domain_prefix": bed.prefix});
    let pause = bed.cp.add_task_for_role("deploy", "pause", "", prefix);
    let third = bed.deploy("d6000000-0000-4000-8000-000000000003", "three");
    assert_eq!(wait_final(&bed.cp, &holder, 60)["status"], "failed");
    assert_eq!(wait_final(&bed.cp, &pause, 60)["status"], "completed");
    let port = bed.completed_port(&third);
    assert!(
        answers(port, "three"),
        "the new version was paused\n{}",
        bed.agent.log()
    );
}

/// The agent's docker CLI is scripts/chaos-docker around the real one: `rules` (its
/// CHAOS_DOCKER_CTL, rewritten at will) inject engine faults, `calls` logs every call.
struct ChaosDocker {
    rules: std::path::PathBuf,
    calls: std::path::PathBuf,
}

impl ChaosDocker {
    fn new(tag: &str) -> ChaosDocker {
        let dir = temp_dir(&format!("chaos-docker-{tag}"));
        let (rules, calls) = (dir.join("rules"), dir.join("calls"));
        std::fs::write(&rules, "").unwrap();
        ChaosDocker { rules, calls }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let shim = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/chaos-docker");
        vec![
            ("DOCKER_CLI", shim.display().to_string()),
            (
                "CHAOS_REAL_DOCKER",
                crate::test_agent::which(&util::docker_cli()),
            ),
            ("CHAOS_DOCKER_CTL", self.rules.display().to_string()),
            ("CHAOS_DOCKER_LOG", self.calls.display().to_string()),
        ]
    }

    fn set(&self, rules: &str) {
        std::fs::write(&self.rules, rules).unwrap();
    }

    /// Calls of `sub` the shim failed on purpose.
    fn failed(&self, sub: &str) -> usize {
        let calls = std::fs::read_to_string(&self.calls).unwrap_or_default();
        let hit = format!(" fail {sub} ");
        calls.lines().filter(|l| l.contains(&hit)).count()
    }
}

/// Rollback retry (real engine): a fixed host port makes a replacement stop the old
/// container; the new one fails health, and the engine refuses the old one's `docker start`
/// once. The retry must start the old container again: it was renamed back already, so
/// renaming it again can only fail, and the app would be left with nothing running.
#[test]
fn a_refused_restart_of_the_stopped_old_container_is_retried() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let chaos = ChaosDocker::new("restore");
    let mut env: Vec<(&str, &str)> = vec![("DEPLOY_HEALTH_TIMEOUT", "4s")];
    let chaos_env = chaos.env();
    env.extend(chaos_env.iter().map(|(k, v)| (*k, v.as_str())));
    let bed = DrainBed::start("restore", &env);
    let fixed = {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let deploy = |image: &str, dep: &str, body: &str| {
        let p = serde_json::json!({"image_tag": image, "deployment_id": dep,
            "project_id": "proj-restore", "domain_prefix": bed.prefix, "container_port": 8080,
            "fixed_host_port": fixed, "env_vars": {"BODY": body}});
        bed.cp.add_task_for_role("deploy", "deploy", dep, p)
    };
    let first = deploy(
        crate::deployer::APP,
        "d7000000-0000-4000-8000-000000000001",
        "one",
    );
    assert_eq!(bed.completed_port(&first), fixed);
    chaos.set("fail 0 start\n");
    let idle = crate::deployer::IDLE;
    let second = deploy(idle, "d7000000-0000-4000-8000-000000000002", "two");
    // Refused once, briefly: the engine takes the next start.
    assert!(
        util::poll(60, || chaos.failed("start") > 0),
        "{}",
        bed.agent.log()
    );
    chaos.set("");
    let r = wait_final(&bed.cp, &second, 120);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        util::poll(10, || answers(fixed, "one")),
        "the old container is not serving again: {r}\n{}",
        bed.agent.log()
    );
}

/// Ordered routing reports (real engine): the control plane refuses every report of the
/// first deploy for good (404: its task was deleted). Its completed report, stuck behind its
/// own refused `running` report, is never tried, yet it must hold the newer deploy's report
/// of the app for at most ROUTE_ORDER_MAX (2 min), not until the running one is parked (2 h).
#[test]
fn a_report_stuck_behind_its_own_refused_running_holds_a_newer_one_at_most_two_minutes() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let bed = DrainBed::start("stuck", &[]);
    bed.cp
        .inject("/api/agent/tasks/", Fault::status(404), 1_000_000);
    let first = bed.deploy_healthy("d8000000-0000-4000-8000-000000000001", "one");
    let second = bed.deploy_healthy("d8000000-0000-4000-8000-000000000002", "two");
    bed.cp.clear_faults();
    let gone = format!("/api/agent/tasks/{first}/");
    bed.cp.inject(&gone, Fault::status(404), 1_000_000);
    let port = bed.completed_port_within(&second, 180);
    assert!(answers(port, "two"), "{}", bed.agent.log());
}

/// Late-log retry after an outage: a build ends while the control plane is away, its lines
/// wait in the late-log queue with a backoff grown to about 15-30 s. Once the control plane
/// answers again, they go within moments, whichever call of the agent it answers first (the
/// node's metrics, a queued report's probe: not only a poll, whose backoff has grown too).
#[test]
fn late_lines_follow_the_end_of_an_outage_within_moments() {
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000fc";
    let env = [
        ("FAKE_GIT_SLEEP", "2"),
        ("FAKE_GIT_LINES", "1000"),
        ("FAKE_GIT_EXIT", "128"),
    ];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&temp_dir("campaign-late-outage"))
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    cp.wait_for("running", Duration::from_secs(30), |cp| {
        crate::agent::statuses(cp, &task) == ["running"]
    });
    cp.go_down();
    std::thread::sleep(Duration::from_secs(45));
    let up = std::time::SystemTime::now();
    cp.come_up();
    assert_eq!(wait_final(&cp, &task, 120)["status"], "failed");
    crate::logs::assert_every_line_once(&cp, dep, 1000, 60);
    let answered = |prefix: &str| {
        cp.requests_to(prefix)
            .into_iter()
            .filter(|r| r.at >= up && r.status == Some(200) && r.fault.is_none())
            .map(|r| r.at)
            .min()
    };
    // Any call of the agent's: the node's metrics go every HEARTBEAT_INTERVAL (2 s), while
    // polls, the queued report and the late lines each wait for their grown backoff.
    let first = answered("/api/").unwrap();
    let logs = answered(&format!("/api/deployments/{dep}/logs")).unwrap();
    let late = logs.duration_since(first).unwrap_or_default();
    assert!(
        late < Duration::from_secs(3),
        "the late lines went {late:?} after the control plane first answered\n{}",
        agent.log()
    );
}

impl ChaosDocker {
    /// The calls made, without the shim's time, pid and fault fields.
    fn calls(&self) -> Vec<String> {
        let calls = std::fs::read_to_string(&self.calls).unwrap_or_default();
        calls
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or("").to_string())
            .collect()
    }
}

/// Per-app turns (real engine): one app's tasks queued in a row, a bad payload among them,
/// change it in the order they were queued, while another app's deploy, queued among them,
/// never waits for the first app's lock.
#[test]
fn an_apps_tasks_keep_their_order_around_a_bad_payload_other_apps_never_wait() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let chaos = ChaosDocker::new("turns");
    let mut env: Vec<(&str, &str)> = vec![("DEPLOY_HEALTH_TIMEOUT", "6s")];
    let chaos_env = chaos.env();
    env.extend(chaos_env.iter().map(|(k, v)| (*k, v.as_str())));
    let bed = DrainBed::start("turns", &env);
    let other = format!("{}-b", bed.prefix);
    let _other_cleanup = util::RemoveContainers::named(&format!("muvee-{other}"));
    let first = bed.deploy("d9000000-0000-4000-8000-000000000001", "one");
    bed.completed_port(&first);
    let app = serde_json::json!({"domain_prefix": bed.prefix});
    let task = |kind: &str, p: serde_json::Value| bed.cp.add_task_for_role("deploy", kind, "", p);
    let holder = bed.deploy_image(
        crate::deployer::IDLE,
        "d9000000-0000-4000-8000-000000000002",
        "idle",
    );
    let mut queued = vec![task("pause", app.clone())];
    let b = serde_json::json!({"image_tag": crate::deployer::APP,
        "deployment_id": "d9000000-0000-4000-8000-0000000000b1", "project_id": "proj-b",
        "domain_prefix": other, "container_port": 8080, "env_vars": {"BODY": "b"}});
    let other_deploy = bed.cp.add_task_for_role(
        "deploy",
        "deploy",
        "d9000000-0000-4000-8000-0000000000b1",
        b,
    );
    let bad = serde_json::json!({"domain_prefix": bed.prefix, "image_tag": "",
        "deployment_id": "d9000000-0000-4000-8000-000000000003", "container_port": 8080});
    let bad = task("deploy", bad);
    queued.push(task("unpause", app.clone()));
    queued.push(task("restart", app.clone()));
    queued.push(bed.deploy("d9000000-0000-4000-8000-000000000004", "two"));
    queued.push(task("pause", app.clone()));
    let at = |task: &str| {
        let r = wait_final(&bed.cp, task, 120);
        let done = bed
            .cp
            .requests_to(&format!("/api/agent/tasks/{task}/complete"));
        let taken = done.iter().filter(|q| {
            q.status == Some(200) && q.json().is_some_and(|b| b["status"] != "running")
        });
        (r, taken.map(|q| q.at).min().unwrap())
    };
    let (r, b_done) = at(&other_deploy);
    assert_eq!(r["status"], "completed", "{r}");
    let (r, holder_done) = at(&holder);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        b_done < holder_done,
        "the other app waited\n{}",
        bed.agent.log()
    );
    assert_eq!(at(&bad).0["status"], "failed");
    for t in &queued {
        assert_eq!(at(t).0["status"], "completed", "{}", bed.agent.log());
    }
    let name = format!("muvee-{}", bed.prefix);
    let order: Vec<&str> = chaos
        .calls()
        .iter()
        .filter_map(|c| {
            let mut w = c.split(' ');
            match w.next()? {
                "run" if c.contains(&format!("--name {name} ")) => Some("deploy"),
                "restart" if w.next() == Some(name.as_str()) => Some("restart"),
                "stop" if !c.starts_with("stop -t") => Some("pause"),
                "start" => Some("unpause"),
                _ => None,
            }
        })
        .collect();
    assert_eq!(
        order,
        ["deploy", "deploy", "pause", "unpause", "restart", "deploy", "pause"],
        "{}",
        bed.agent.log()
    );
}

/// Per-app turns across stops (real engine): with a queue of one app's tasks behind a deploy
/// that holds its lock, a double SIGTERM (cancel) and then a kill -9 each stop the agent;
/// every queued task is reported, the old version keeps serving, and after each restart on
/// the same DATA_DIR the app's next task runs (no turn is left waiting for ever).
#[test]
fn a_queue_of_turns_survives_cancel_and_kill_then_restart() {
    if !util::require_docker(crate::util::test_name!()) {
        return;
    }
    let mut bed = DrainBed::start("turnstop", &[("DEPLOY_HEALTH_TIMEOUT", "20s")]);
    let first = bed.deploy("da000000-0000-4000-8000-000000000001", "one");
    let port = bed.completed_port(&first);
    let app = serde_json::json!({"domain_prefix": bed.prefix});
    let idle = crate::deployer::IDLE;
    for (n, sigs) in [
        (2u8, &[libc::SIGTERM, libc::SIGTERM][..]),
        (3, &[libc::SIGKILL]),
    ] {
        let before = bed.agent.log().matches("Starting container").count();
        let holder = bed.deploy_image(
            idle,
            &format!("da000000-0000-4000-8000-00000000000{n}"),
            "idle",
        );
        let queued: Vec<String> = ["pause", "restart", "unpause"]
            .iter()
            .map(|k| bed.cp.add_task_for_role("deploy", k, "", app.clone()))
            .collect();
        let started = || bed.agent.log().matches("Starting container").count() > before;
        assert!(util::poll(60, started), "{}", bed.agent.log());
        for s in sigs {
            bed.agent.signal(*s);
            std::thread::sleep(Duration::from_millis(300));
        }
        let exited = bed.agent.wait_exit(Duration::from_secs(60));
        assert!(exited.is_some(), "{}", bed.agent.log());
        bed.agent = TestAgent::builder("deploy")
            .cp(&bed.cp)
            .dir(&bed.agent.dir.clone())
            .real_docker()
            .env("DEPLOY_DRAIN", "1s")
            .start();
        for t in queued.iter().chain([&holder]) {
            let r = wait_final(&bed.cp, t, 60);
            assert_eq!(r["status"], "failed", "{t}: {r}\n{}", bed.agent.log());
        }
        assert!(
            util::poll(30, || answers(port, "one")),
            "{}",
            bed.agent.log()
        );
        let restart = bed
            .cp
            .add_task_for_role("deploy", "restart", "", app.clone());
        let r = wait_final(&bed.cp, &restart, 60);
        assert_eq!(r["status"], "completed", "{r}\n{}", bed.agent.log());
        assert!(
            util::poll(30, || answers(port, "one")),
            "{}",
            bed.agent.log()
        );
    }
}
