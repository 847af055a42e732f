//! The deployment log shipper through the agent loop, against the fake control plane: how
//! soon a quiet task's line arrives, bodies that pass nginx's 1 MiB limit, a failing route
//! that must hold neither the final report nor a SIGTERM and loses no line (the late-log
//! queue, across a restart too), a spill that cannot be written, a secret across the 16 KiB
//! line cut. External commands are the PATH shims.

use crate::agent::{chatty_build, statuses, wait_final};
use crate::fake_cp::{FakeCp, Fault, Version};
use crate::test_agent::{TestAgent, SECRET};
use crate::util::{self, temp_dir};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn builder_cp() -> FakeCp {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    cp
}

fn log_route(dep: &str) -> String {
    format!("/api/deployments/{dep}/logs")
}

/// The numbers of the stand-in's lines in a stored log, in order.
pub fn numbers(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("remote: progress line "))
        .map(|n| {
            let digits = n.bytes().take_while(u8::is_ascii_digit).count();
            n[..digits].parse().unwrap()
        })
        .collect()
}

/// The counts of the drop markers in a stored log.
pub fn dropped(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("[muvee-agent: "))
        .filter_map(|l| l.split_once(" log lines dropped: "))
        .map(|(n, _)| n.parse().unwrap())
        .collect()
}

/// Every line printed is in the log, in order, or counted by a marker that names `why`.
pub fn assert_delivered_or_counted(log: &str, total: u64, why: &str) {
    let nums = numbers(log);
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "out of order");
    let lost = dropped(log);
    assert!(!lost.is_empty(), "no marker in {} bytes", log.len());
    for m in log.lines().filter(|l| l.starts_with("[muvee-agent: ")) {
        assert!(m.contains(why), "{m}");
    }
    assert_eq!(nums.len() as u64 + lost.iter().sum::<u64>(), total);
}

/// The log route answers 502 until the agent warns that its spill failed, then takes logs
/// again. `start` starts the agent once the fault is in place. Checks that the agent warned
/// once and every line of the build of `total` lines (task `task`) is in the log or counted
/// by a marker naming `why`; returns the log.
pub fn fail_the_route_until_the_spill_fails(
    cp: &FakeCp,
    start: impl FnOnce() -> (TestAgent, String),
    dep: &str,
    total: u64,
    why: &str,
) -> String {
    let page = "<html>502 Bad Gateway</html>".to_string();
    cp.inject(
        "/api/deployments/",
        Fault::Status(502, "text/html", page),
        1_000_000,
    );
    let (agent, task) = start();
    let warning = "cannot write the log spill";
    assert!(
        util::poll(120, || agent.log().contains(warning)),
        "{}",
        agent.log()
    );
    cp.clear_faults();
    assert_eq!(wait_final(cp, &task, 180)["status"], "failed");
    // A task that ended while the route still failed hands its rest to the late-log queue:
    // those lines may follow the final report.
    let log = || String::from_utf8(cp.logs(dep)).unwrap();
    let accounted = |l: &str| numbers(l).len() as u64 + dropped(l).iter().sum::<u64>();
    util::poll(60, || accounted(&log()) >= total);
    let log = log();
    assert_delivered_or_counted(&log, total, why);
    assert_eq!(agent.log().matches(warning).count(), 1);
    log
}

/// A build printing two lines a second: each reaches the control plane within 250 ms, not at
/// a flush tick.
#[test]
fn a_quiet_tasks_lines_reach_the_control_plane_within_250_ms() {
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000f0";
    let dir = temp_dir("logs-latency");
    let env = [("FAKE_GIT_TICKS", "20"), ("FAKE_GIT_EXIT", "128")];
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 60)["status"], "failed");
    let mut late: Vec<Duration> = Vec::new();
    for r in cp.requests_to(&log_route(dep)) {
        let text = r.json().unwrap()["line"].as_str().unwrap().to_string();
        for ns in text.lines().filter_map(|l| l.strip_prefix("tick ")) {
            let printed = UNIX_EPOCH + Duration::from_nanos(ns.parse().unwrap());
            late.push(r.at.duration_since(printed).unwrap_or_default());
        }
    }
    assert_eq!(late.len(), 20);
    late.sort();
    assert!(
        late[17] <= Duration::from_millis(250),
        "p90 over 250 ms: {late:?}"
    );
}

/// Lines full of quotes (two bytes each in JSON) wait while the route stalls: every request
/// body stays within nginx's 1 MiB, so none gets a 413, and every line arrives.
#[test]
fn log_bodies_fit_nginxs_1_mib_limit_once_escaped() {
    let cp = builder_cp();
    cp.limit_body(1 << 20);
    cp.inject("/api/deployments/", Fault::Hang(Duration::from_secs(4)), 1);
    let dep = "c0ffee00-1234-4abc-9def-0000000000f1";
    let dir = temp_dir("logs-body");
    let pad = "\"".repeat(200);
    let env = [
        ("FAKE_GIT_LINES", "12000"),
        ("FAKE_GIT_PAD", pad.as_str()),
        ("FAKE_GIT_EXIT", "128"),
    ];
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 90)["status"], "failed");
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    assert_eq!(numbers(&log), (1..=12_000).collect::<Vec<u64>>());
    assert_eq!(log.matches(&format!("{pad}\n")).count(), 12_000);
    let requests = cp.requests_to(&log_route(dep));
    let largest = requests.iter().map(|r| r.body.len()).max().unwrap();
    assert!(largest <= 1 << 20, "a body of {largest} bytes");
    assert!(
        largest > 512 << 10,
        "batches grew with the backlog: {largest}"
    );
    assert!(requests.iter().all(|r| r.status != Some(413)));
}

/// The route answers today's server's 500 (a database outage).
fn fail_the_log_route(cp: &FakeCp) {
    let body = r#"{"error":"failed to connect to `host=db`: dial tcp: connection refused"}"#;
    let fault = Fault::Status(500, "application/json", body.into());
    cp.inject("/api/deployments/", fault, 1_000_000);
}

/// The late-log files left in `dir`'s DATA_DIR, with their modes.
fn late_files(dir: &Path) -> Vec<(String, u32)> {
    let late = dir.join("data/state/late-logs");
    let mut v: Vec<(String, u32)> = std::fs::read_dir(late)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            (e.file_name().into_string().unwrap(), mode)
        })
        .collect();
    v.sort();
    v
}

/// Waits until the stored log of `dep` holds `n` numbered lines, then a moment more (a
/// duplicate would come soon after): they are 1..=n in order, once each, and no marker.
pub fn assert_every_line_once(cp: &FakeCp, dep: &str, n: u64, secs: u64) {
    let count = || numbers(&String::from_utf8(cp.logs(dep)).unwrap()).len() as u64;
    let all = util::poll(secs, || count() >= n);
    assert!(all, "{} of {n} lines\n{}", count(), cp.dump(20));
    std::thread::sleep(Duration::from_secs(3));
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    assert_eq!(numbers(&log), (1..=n).collect::<Vec<u64>>());
    assert!(dropped(&log).is_empty(), "a drop marker");
}

/// Starts a builder agent on `dir` with `env` and a build of `dep` whose git fetch fails;
/// returns them once its final report (failed) is in.
fn failed_build(cp: &FakeCp, dir: &Path, env: &[(&str, &str)], dep: &str) -> (TestAgent, String) {
    let agent = TestAgent::builder("builder")
        .cp(cp)
        .dir(dir)
        .envs(env)
        .start();
    let task = chatty_build(cp, dep);
    assert_eq!(wait_final(cp, &task, 60)["status"], "failed");
    (agent, task)
}

/// The log route answers 500 for about 20 s around the end of a build of 20,000 lines, and
/// a symlink to another directory waits where the late-log dir goes. The final report
/// arrives at once (not 15 s later), while the route still fails; the lines wait in a
/// private late-log file (the symlink replaced, not followed), and once the route takes
/// logs again every line is in the stored log, in order, once; the file is removed.
#[test]
fn a_log_outage_at_a_builds_end_holds_no_final_report_and_loses_no_line() {
    use std::os::unix::fs::symlink;
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000f6";
    let dir = temp_dir("logs-late");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.join("data/state")).unwrap();
    symlink(&elsewhere, dir.join("data/state/late-logs")).unwrap();
    let end = dir.join("git-end");
    let env = [
        ("FAKE_GIT_LINES", "20000"),
        ("FAKE_GIT_EXIT", "128"),
        ("FAKE_GIT_END", end.to_str().unwrap()),
    ];
    fail_the_log_route(&cp);
    let outage = Instant::now();
    let (_agent, task) = failed_build(&cp, &dir, &env, dep);
    let ns: u64 = std::fs::read_to_string(&end)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ended = UNIX_EPOCH + Duration::from_nanos(ns);
    let held = final_report_at(&cp, &task).duration_since(ended).unwrap();
    assert!(
        held < Duration::from_secs(5),
        "final report {held:?} after the build ended"
    );
    assert!(cp.logs(dep).is_empty(), "logs taken during the outage");
    let late = dir.join("data/state/late-logs");
    let meta = std::fs::symlink_metadata(&late).unwrap();
    assert!(meta.is_dir(), "the symlink was followed");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let files = late_files(&dir);
    assert!(
        !files.is_empty() && files.iter().all(|(_, m)| *m == 0o600),
        "{files:?}"
    );
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    let mode = std::fs::metadata(&elsewhere).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let left = Duration::from_secs(20).saturating_sub(outage.elapsed());
    assert!(!left.is_zero(), "the build took the whole outage");
    std::thread::sleep(left);
    cp.clear_faults();
    assert_every_line_once(&cp, dep, 20_000, 90);
    assert!(late_files(&dir).is_empty(), "{:?}", late_files(&dir));
}

/// More than LOG_SPILL_MAX (256 KiB) of late logs wait: the oldest lines are kept, and once
/// the route takes logs again one marker counts exactly the lines missing.
#[test]
fn beyond_log_spill_max_late_logs_are_counted_by_one_marker() {
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000f7";
    let dir = temp_dir("logs-late-cap");
    let env = [
        ("FAKE_GIT_LINES", "20000"),
        ("FAKE_GIT_EXIT", "128"),
        ("LOG_SPILL_MAX", "256K"),
    ];
    fail_the_log_route(&cp);
    let _agent = failed_build(&cp, &dir, &env, dep).0;
    assert!(!late_files(&dir).is_empty());
    cp.clear_faults();
    let marked = || !dropped(&String::from_utf8(cp.logs(dep)).unwrap()).is_empty();
    assert!(util::poll(90, marked), "{}", cp.dump(20));
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    assert_delivered_or_counted(&log, 20_000, "of late logs waited for the control plane");
    let nums = numbers(&log);
    assert_eq!(
        nums,
        (1..=nums.len() as u64).collect::<Vec<u64>>(),
        "the oldest kept"
    );
    assert_eq!(dropped(&log).len(), 1);
    // Whole lines up to the cap: the stored log is byte-identical to the late file.
    let kept = log.find("[muvee-agent: ").unwrap();
    assert!(
        kept <= 256 << 10 && kept > (256 << 10) - 64,
        "{kept} bytes kept"
    );
}

/// The log route answers 500 for ever and the agent gets SIGTERM while a build runs: the
/// build's own outcome is reported (not "agent restarted"), the agent exits soon, and its
/// lines wait in the late-log queue: the next start delivers every one, once.
#[test]
fn a_failing_log_route_holds_neither_the_final_report_nor_sigterm() {
    let cp = builder_cp();
    fail_the_log_route(&cp);
    let dep = "c0ffee00-1234-4abc-9def-0000000000f2";
    let dir = temp_dir("logs-502");
    let env = [
        ("FAKE_GIT_SLEEP", "3"),
        ("FAKE_GIT_LINES", "20000"),
        ("FAKE_GIT_EXIT", "128"),
    ];
    let mut agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    cp.wait_for("running", Duration::from_secs(30), |cp| {
        statuses(cp, &task) == ["running"]
    });
    agent.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after {:?}\n{}",
        t0.elapsed(),
        agent.log()
    );
    let c = wait_final(&cp, &task, 1);
    assert_eq!(c["status"], "failed");
    let why = c["result"].as_str().unwrap();
    assert!(why.contains("git fetch") && why.contains("128"), "{why}");
    assert!(!agent.log().contains("did not stop"), "{}", agent.log());
    assert!(agent.log().contains("handed to the late-log queue"));
    assert!(cp.logs(dep).is_empty(), "logs taken during the outage");
    assert!(!late_files(&dir).is_empty());
    cp.clear_faults();
    let _again = TestAgent::builder("builder").cp(&cp).dir(&dir).start();
    assert_every_line_once(&cp, dep, 20_000, 90);
    assert!(late_files(&dir).is_empty(), "{:?}", late_files(&dir));
}

/// When the final report of `task` reached the control plane.
fn final_report_at(cp: &FakeCp, task: &str) -> SystemTime {
    let reports = cp.requests_to(&format!("/api/agent/tasks/{task}/complete"));
    let last = reports.iter().rev().find(|r| {
        r.json()
            .is_some_and(|c| c["status"] == "failed" || c["status"] == "completed")
    });
    last.expect("a final report").at
}

/// The log route hangs (takes nothing, refuses nothing): no request outlives the hand-off
/// time, so the final report arrives 15 s after the task's last line (not 20 s after the
/// request began, as with the client's full timeout), the lines handed to the late-log
/// queue.
#[test]
fn a_hanging_log_route_holds_the_final_report_at_most_15_s() {
    let cp = builder_cp();
    let hang = Fault::Hang(Duration::from_secs(60));
    cp.inject("/api/deployments/", hang, 1_000_000);
    let dep = "c0ffee00-1234-4abc-9def-0000000000f4";
    let dir = temp_dir("logs-hang");
    let env = [("FAKE_GIT_LINES", "50"), ("FAKE_GIT_EXIT", "128")];
    let agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    assert_eq!(wait_final(&cp, &task, 60)["status"], "failed");
    // The task ends right after its lines: the first log request is the close.
    let closed = cp.requests_to(&log_route(dep))[0].at;
    let held = final_report_at(&cp, &task).duration_since(closed).unwrap();
    assert!(agent.log().contains("handed to the late-log queue"));
    assert!(
        held >= Duration::from_secs(14) && held < Duration::from_secs(17),
        "final report {held:?} after close"
    );
}

/// Two SIGTERMs while a build runs and its log request hangs: the agent does not wait for
/// the request, reports the task canceled and exits within seconds, the lines that waited
/// handed to the late-log queue (a local write) for the next start.
#[test]
fn a_double_sigterm_does_not_wait_for_a_hanging_log_request() {
    let cp = builder_cp();
    cp.inject(
        "/api/deployments/",
        Fault::Hang(Duration::from_secs(60)),
        1_000_000,
    );
    let dep = "c0ffee00-1234-4abc-9def-0000000000f5";
    let dir = temp_dir("logs-cancel");
    let env = [("FAKE_GIT_TICKS", "120"), ("FAKE_GIT_EXIT", "0")];
    let mut agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let task = chatty_build(&cp, dep);
    cp.wait_for("a hanging log request", Duration::from_secs(30), |cp| {
        !cp.requests_to(&log_route(dep)).is_empty()
    });
    // A few more ticks wait behind the hanging request.
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    agent.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(60));
    let took = t0.elapsed();
    assert!(status.is_some(), "still running\n{}", agent.log());
    assert!(
        took < Duration::from_secs(5),
        "exit {took:?} after the second SIGTERM\n{}",
        agent.log()
    );
    let c = wait_final(&cp, &task, 1);
    assert_eq!(c["status"], "failed");
    assert!(
        c["result"]
            .as_str()
            .unwrap()
            .contains("canceled: agent shutting down"),
        "{c}"
    );
    // The ticks behind the hanging request wait in a late-log file, not for the route.
    let log = agent.log();
    let handed = log
        .lines()
        .find(|l| l.contains("handed to the late-log queue"))
        .and_then(|l| {
            l.split("canceled: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        });
    assert!(handed.is_some_and(|n| n > 0), "{log}");
    let late = dir.join("data/state/late-logs");
    let kept: String = late_files(&dir)
        .iter()
        .map(|(f, _)| std::fs::read_to_string(late.join(f)).unwrap())
        .collect();
    assert_eq!(kept.lines().count() as u64, handed.unwrap());
    assert!(kept.lines().any(|l| l.starts_with("tick ")), "{kept}");
}

/// DATA_DIR/state/logs cannot be created and the route fails while a build prints 12.6 MB:
/// memory keeps 8 MiB, the rest is counted, one marker per gap says how many lines and
/// why, and the agent warns once, not once per line.
#[test]
fn an_unwritable_spill_dir_drops_lines_with_a_marker_and_warns_once() {
    let cp = builder_cp();
    let dep = "c0ffee00-1234-4abc-9def-0000000000f3";
    let dir = temp_dir("logs-unwritable");
    let start = || {
        let env = [("FAKE_GIT_LINES", "450000"), ("FAKE_GIT_EXIT", "128")];
        let agent = TestAgent::builder("builder")
            .cp(&cp)
            .dir(&dir)
            .envs(&env)
            .start();
        cp.wait_for("registration", Duration::from_secs(30), |cp| {
            cp.node_id_for_role("builder").is_some()
        });
        // After start (which clears state/logs): a file where the spill dir goes.
        let logs = dir.join("data/state/logs");
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::write(&logs, "not a directory").unwrap();
        (agent, chatty_build(&cp, dep))
    };
    fail_the_route_until_the_spill_fails(&cp, start, dep, 450_000, "the log spill");
}

/// A build prints 16,375 spaces and then its git credential, at once and in writes apart:
/// the executor cuts lines at 16 KiB, and neither half of the credential reaches the log.
#[test]
fn a_secret_across_the_16_kib_line_cut_is_masked() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.set_config("registry_addr", "127.0.0.1:5000");
    let dep = "c0ffee00-1234-4abc-9def-0000000000fb";
    let dir = temp_dir("agent-logs-cut");
    let env = [("FAKE_GIT_LEAK", "16375"), ("FAKE_GIT_EXIT", "128")];
    let _agent = TestAgent::builder("builder")
        .cp(&cp)
        .dir(&dir)
        .envs(&env)
        .start();
    let token = "tok-cut-7b1d93e0c4";
    let payload = json!({
        "git_url": "https://git.example/app.git", "git_branch": "main", "git_username": "u",
        "git_token": token, "deployment_id": dep,
        "project_id": "7a7a7a7a-0000-4000-8000-000000000009", "domain_prefix": "logs"
    });
    let task = cp.add_task_for_role("builder", "build", dep, payload);
    assert_eq!(wait_final(&cp, &task, 30)["status"], "failed");
    let log = String::from_utf8(cp.logs(dep)).unwrap();
    let basic = util::base64(format!("u:{token}").as_bytes());
    let pad = " ".repeat(16375);
    let shown = log.replace(&pad, "<pad>");
    assert!(
        log.contains(&format!("{pad}***\n")),
        "masked at once: {shown}"
    );
    assert!(
        log.contains(&format!("{pad}\n*** end\n")),
        "masked across reads"
    );
    let (a, b) = basic.split_at(9);
    assert!(
        !log.contains(a) && !log.contains(b),
        "a half of the credential shows"
    );
}
