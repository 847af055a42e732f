//! The deploy role's control channel (protocol §1.10) against the dev control plane's
//! WebSocket side (`examples/dev-cp/control.rs`): `exec` and `cp` sessions on a real
//! container, and the channel coming back after the node or the connection is lost.

use crate::deployer::{images, IDLE};
use crate::dev_cp::DevCp;
use crate::fake_cp::{frame_data, ControlConn, FakeCp, Upgrade, Version};
use crate::test_agent::{TestAgent, SECRET};
use crate::util::{self, require_docker, temp_dir, test_name, RemoveContainers};
use serde_json::json;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../examples/dev-cp/tls.rs"]
mod tls;

/// `docker exec -ti` sizes the container's TTY just after the process starts: wait for it.
const WAIT_SIZE: &str = "i=0; while [ $i -lt 100 ]; do s=$(stty size 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != \"0 0\" ] && break; i=$((i+1)); sleep 0.1; done; echo \"size=$s\"; exit 3";
const FRAME_WAIT: Duration = Duration::from_secs(20);

/// A deploy agent on today's control plane, and the container its sessions reach (an app
/// of the agent's node).
struct Bed {
    cp: FakeCp,
    container: String,
    agent: TestAgent,
    _cleanup: RemoveContainers,
}

/// A NODE_NAME of its own for each test's agent.
fn node_name() -> String {
    format!(
        "itx-node-{}-{}",
        std::process::id(),
        &util::unique_hex()[..6]
    )
}

/// A running app container `muvee-<prefix>` of node `node` (labelled as the deployer labels
/// its containers), or with no labels at all; removed when the guard is dropped.
fn app_container(prefix: &str, node: Option<&str>) -> (String, RemoveContainers) {
    images();
    let container = format!("muvee-{prefix}");
    let cleanup = RemoveContainers::named(&container);
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        container.clone(),
    ];
    if let Some(node) = node {
        for l in [
            "muvee.managed=true".to_string(),
            format!("muvee.node={node}"),
            format!("muvee.domain_prefix={prefix}"),
        ] {
            args.extend(["--label".into(), l]);
        }
    }
    args.push(IDLE.into());
    util::sh(Command::new(util::docker_cli()).args(&args));
    (container, cleanup)
}

/// A running container of node `node`'s app (prefix: its name without `muvee-`).
fn idle_container(node: &str) -> (String, RemoveContainers) {
    let prefix = format!("itx-{}-{}", std::process::id(), &util::unique_hex()[..6]);
    app_container(&prefix, Some(node))
}

impl Bed {
    fn start() -> Bed {
        Bed::start_with(None, &[])
    }

    /// `url`: the agent's CONTROL_PLANE_URL instead of the fake control plane's (a front).
    fn start_with(url: Option<&str>, env: &[(&str, &str)]) -> Bed {
        let node = node_name();
        let (container, cleanup) = idle_container(&node);
        let cp = FakeCp::start(Version::Today, SECRET);
        let agent = TestAgent::builder("deploy")
            .cp(&cp)
            .real_docker()
            .env("POLL_INTERVAL", "1s")
            .env("NODE_NAME", &node);
        let agent = match url {
            Some(u) => agent.url(u),
            None => agent,
        };
        let agent = agent.envs(env).start();
        Bed {
            cp,
            container,
            agent,
            _cleanup: cleanup,
        }
    }

    fn prefix(&self) -> &str {
        &self.container[6..]
    }

    /// The agent's next control connection within `secs` (the server said `hello`).
    fn accept(&self, secs: u64) -> Arc<ControlConn> {
        self.cp
            .control()
            .accept(Duration::from_secs(secs))
            .expect("the agent never dialled the control channel")
    }
}

/// Reads `session`'s output until it contains `needle`; Err(what came) if it did not
/// within `timeout`.
fn read_until(
    ws: &ControlConn,
    session: &str,
    needle: &str,
    timeout: Duration,
) -> Result<(), String> {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let frame = end
            .checked_duration_since(Instant::now())
            .and_then(|left| ws.recv_session(session, left));
        match frame {
            Some(f) => seen.extend(frame_data(&f)),
            None => return Err(String::from_utf8_lossy(&seen).into_owned()),
        }
    }
    Ok(())
}

/// Types `stty size` into `session` once a second until it prints `size` ("rows cols");
/// Err(what came) after [`FRAME_WAIT`], which outlasts the agent's last nudge to the docker
/// client (15 s after a resize). The new size reaches the container later than typed input
/// (SIGWINCH to docker, then the engine's API): a `stty size` typed at once may print the
/// old one, so it is asked again, as a person would.
fn ask_size_until(ws: &ControlConn, session: &str, size: &str) -> Result<(), String> {
    let end = Instant::now() + FRAME_WAIT;
    // One buffer for every answer: an answer may arrive split, or after the next question.
    let mut seen = Vec::new();
    while Instant::now() < end {
        ws.stdin(session, b"stty size\n").unwrap();
        let next = Instant::now() + Duration::from_secs(1);
        while let Some(f) = next
            .checked_duration_since(Instant::now())
            .and_then(|left| ws.recv_session(session, left))
        {
            seen.extend(frame_data(&f));
            if String::from_utf8_lossy(&seen).contains(size) {
                return Ok(());
            }
        }
    }
    Err(String::from_utf8_lossy(&seen).into_owned())
}

#[test]
fn exec_sessions_echo_take_input_resize_and_report_exit_codes() {
    if !require_docker(test_name!()) {
        return;
    }
    let bed = Bed::start();
    let ws = bed.accept(20);
    let node = bed.cp.node_id_for_role("deploy").unwrap();
    assert_eq!(ws.target(), format!("/api/agent/control?node_id={node}"));

    // echo: output, exit 0 sends no code; by domain prefix.
    let prefix = bed.prefix();
    ws.send(
        &json!({"type": "open_exec", "session": "s1", "domain_prefix": prefix,
                "container": format!("muvee-{prefix}"), "cmd": ["echo", "hello-pty"]}),
    )
    .unwrap();
    let s1 = ws.outcome("s1", FRAME_WAIT).expect("s1 ended");
    assert!(
        String::from_utf8_lossy(&s1.output).contains("hello-pty"),
        "{s1:?}"
    );
    assert_eq!(s1.end, json!({"type": "exit", "session": "s1"}));

    // A non-zero exit code, and the PTY size (cols x rows) the session asked for.
    ws.send(
        &json!({"type": "open_exec", "session": "s2", "container": bed.container,
                "cmd": ["sh", "-c", WAIT_SIZE], "cols": 101, "rows": 33}),
    )
    .unwrap();
    let s2 = ws.outcome("s2", FRAME_WAIT).expect("s2 ended");
    assert!(
        String::from_utf8_lossy(&s2.output).contains("size=33 101"),
        "{}",
        String::from_utf8_lossy(&s2.output)
    );
    assert_eq!(s2.end["code"], 3, "{}", s2.end);

    // Interactive: typed input, a resize, then close kills it (-1).
    ws.open_exec("s3", &bed.container, &["sh"]).unwrap();
    ws.stdin("s3", b"echo typed-$((6*7))\n").unwrap();
    if let Err(seen) = read_until(&ws, "s3", "typed-42", Duration::from_secs(10)) {
        panic!("s3: no typed-42 within 10s: {seen:?}");
    }
    ws.resize("s3", 77, 11).unwrap();
    if let Err(seen) = ask_size_until(&ws, "s3", "11 77") {
        panic!("s3: never 11 77: {seen:?}");
    }
    ws.close_session("s3").unwrap();
    let s3 = ws.outcome("s3", FRAME_WAIT).expect("s3 ended");
    assert_eq!(s3.end["code"], -1, "{}", s3.end);

    // Missing fields → error frames, as the Go agent words them.
    ws.send(&json!({"type": "open_exec", "session": "s4", "container": bed.container}))
        .unwrap();
    assert_eq!(
        ws.recv_session("s4", FRAME_WAIT).unwrap()["msg"],
        "open_exec requires session/container/cmd"
    );
    ws.open_cp("s5", &bed.container, "/tmp", "sideways")
        .unwrap();
    assert_eq!(
        ws.recv_session("s5", FRAME_WAIT).unwrap()["msg"],
        "open_cp direction must be 'up' or 'down'"
    );

    // The node was deleted: the agent registers again and dials with the new id.
    bed.cp.forget_nodes();
    let again = bed.accept(15);
    let new = bed.cp.node_id_for_role("deploy").unwrap();
    assert_ne!(new, node);
    assert_eq!(again.target(), format!("/api/agent/control?node_id={new}"));
}

#[test]
fn cp_up_and_down_round_trip_a_directory_and_the_channel_reconnects() {
    if !require_docker(test_name!()) {
        return;
    }
    let bed = Bed::start();
    let ws = bed.accept(20);

    // A directory with text, binary and nested files, as a tar made by tar(1).
    let src = temp_dir("cp-src");
    std::fs::create_dir_all(src.join("tree/sub")).unwrap();
    std::fs::write(src.join("tree/a.txt"), "alpha\n").unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("tree/sub/blob.bin"), &blob).unwrap();
    let tar = util::sh(
        Command::new("sh")
            .arg("-c")
            .arg(format!("tar -C {} -cf - tree | base64 -w0", src.display())),
    );
    use base64::Engine;
    let tar = base64::engine::general_purpose::STANDARD
        .decode(tar.trim())
        .unwrap();
    ws.open_cp("u1", &bed.container, "/tmp", "up").unwrap();
    ws.upload("u1", &tar).unwrap();
    let u1 = ws.outcome("u1", FRAME_WAIT).expect("u1 ended");
    assert_eq!(u1.end, json!({"type": "exit", "session": "u1"}));

    ws.open_cp("d1", &bed.container, "/tmp/tree", "down")
        .unwrap();
    let d1 = ws.outcome("d1", FRAME_WAIT).expect("d1 ended");
    let expected = ["cp_down_tar", "cp_end", "exit"];
    assert!(
        d1.kinds.iter().all(|k| expected.contains(&k.as_str())),
        "{:?}: {}",
        d1.kinds,
        d1.end
    );
    assert!(
        d1.kinds.iter().any(|k| k == "cp_end"),
        "no cp_end before exit"
    );
    let dst = temp_dir("cp-dst");
    let mut untar = Command::new("tar")
        .arg("-C")
        .arg(&dst)
        .arg("-xf")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    untar.stdin.take().unwrap().write_all(&d1.output).unwrap();
    assert!(untar.wait().unwrap().success());
    assert_eq!(std::fs::read(dst.join("tree/sub/blob.bin")).unwrap(), blob);
    assert_eq!(
        std::fs::read_to_string(dst.join("tree/a.txt")).unwrap(),
        "alpha\n"
    );

    // A missing path: as the Go agent, `cp_end` first (muveectl closes its untar on it and
    // only then reads the exit code), then docker's error text on stderr, then exit 1.
    ws.open_cp("d2", &bed.container, "/no/such", "down")
        .unwrap();
    let d2 = ws.outcome("d2", FRAME_WAIT).expect("d2 ended");
    assert_eq!(d2.kinds, ["cp_end", "stdio", "exit"], "{}", d2.end);
    assert!(
        String::from_utf8_lossy(&d2.output).contains("/no/such"),
        "{d2:?}"
    );
    assert_eq!(d2.end["code"], 1, "{}", d2.end);

    // The server drops the connection: the agent dials again.
    ws.disconnect();
    let ws = bed.accept(10);
    ws.open_exec("r1", &bed.container, &["true"]).unwrap();
    assert_eq!(
        ws.outcome("r1", FRAME_WAIT).expect("r1 ended").end,
        json!({"type": "exit", "session": "r1"})
    );
}

/// The dev-cp binary serves the same channel: `dev-cp exec` runs a command in the container
/// through the deploy agent, with its output and exit code.
#[test]
fn the_dev_cp_binary_execs_through_the_agents_control_channel() {
    if !require_docker(test_name!()) {
        return;
    }
    let node = node_name();
    let (container, _cleanup) = idle_container(&node);
    let server = DevCp::serve(SECRET, &[]);
    let _agent = TestAgent::builder("deploy")
        .url(&server.url)
        .real_docker()
        .env("NODE_NAME", &node)
        .start();
    let c = container.as_str();
    let mut last = (false, String::new());
    let dialled = util::poll(20, || {
        last = server.cli(&["exec", c, "--", "sh", "-c", "echo out-$((6*7)); exit 5"]);
        !last.1.contains("no agent has its control channel open")
    });
    assert!(dialled, "{last:?}");
    assert!(!last.0 && last.1.contains("out-42"), "{last:?}");
    assert!(last.1.contains("the command exited with 5"), "{last:?}");
    let (ok, text) = server.cli(&["exec", c, "--", "echo", "hi"]);
    assert!(ok && text.contains("hi"), "{text}");
    let (ok, text) = server.cli(&["exec", c, "echo", "hi"]);
    assert!(!ok && text.contains("exec: give <container>"), "{text}");
}

/// `docker top`: the processes running in `container`, one per line.
fn top(container: &str) -> String {
    let out = util::docker(&["top", container], &[]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The peak resident memory (VmHWM) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `tar -C dir -cf - name`.
fn tar_of(dir: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", name])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn exec_and_cp_reach_only_this_nodes_apps() {
    if !require_docker(test_name!()) {
        return;
    }
    let bed = Bed::start();
    let ws = bed.accept(20);
    // An app of another node on the same engine, and a container muvee knows nothing of
    // (another installation's, the registry).
    let hex = util::unique_hex();
    let other = format!("itx-{}-{}-other", std::process::id(), &hex[..6]);
    let plain = format!("itx-{}-{}-plain", std::process::id(), &hex[..6]);
    let _other = app_container(&other, Some("some-other-node"));
    let _plain = app_container(&plain, None);
    let refused = [
        json!({"type": "open_exec", "session": "x1", "container": format!("muvee-{plain}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_exec", "session": "x2", "domain_prefix": other, "container": format!("muvee-{other}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_exec", "session": "x3", "container": format!("muvee-{other}"), "cmd": ["echo", "ran"]}),
        json!({"type": "open_cp", "session": "x4", "container": format!("muvee-{plain}"), "path": "/etc/hostname", "direction": "down"}),
        json!({"type": "open_cp", "session": "x5", "domain_prefix": plain, "container": format!("muvee-{plain}"), "path": "/tmp", "direction": "up"}),
    ];
    for open in refused {
        let s = open["session"].as_str().unwrap().to_string();
        ws.send(&open).unwrap();
        let o = ws.outcome(&s, FRAME_WAIT).expect("ended");
        assert_eq!(o.kinds, ["error"], "{s}: {o:?}");
        let msg = o.end["msg"].as_str().unwrap();
        assert!(msg.contains("this node's apps"), "{s}: {msg}");
    }
    // This node's app, by its prefix and by its container's name.
    ws.send(
        &json!({"type": "open_exec", "session": "o1", "domain_prefix": bed.prefix(),
                    "container": bed.container, "cmd": ["echo", "ours"]}),
    )
    .unwrap();
    let o1 = ws.outcome("o1", FRAME_WAIT).expect("o1 ended");
    assert!(
        String::from_utf8_lossy(&o1.output).contains("ours"),
        "{o1:?}"
    );
    ws.open_exec("o2", &bed.container, &["true"]).unwrap();
    let o2 = ws.outcome("o2", FRAME_WAIT).expect("o2 ended");
    assert_eq!(o2.end, json!({"type": "exit", "session": "o2"}));
}

/// A running container with `labels`, and `WHO=<who>` in its environment.
fn labelled_container(name: &str, who: &str, labels: &[String]) {
    let mut args = vec!["run", "-d", "--name", name, "-e"];
    let who = format!("WHO={who}");
    args.push(&who);
    for l in labels {
        args.extend(["--label", l.as_str()]);
    }
    args.push(IDLE);
    util::sh(Command::new(util::docker_cli()).args(&args));
}

#[test]
fn a_compose_container_counts_only_for_the_app_of_its_project() {
    if !require_docker(test_name!()) {
        return;
    }
    images();
    let hex = &util::unique_hex()[..6];
    let (node, victim, evil) = (node_name(), format!("itxv{hex}"), format!("itxe{hex}"));
    let _c = [&victim, &evil].map(|p| RemoveContainers::named(&format!("muvee-{p}-")));
    let home = temp_dir("control-compose");
    let staged = home.join("data/compose").join(&victim);
    std::fs::create_dir_all(staged.join("src")).unwrap();
    let project = |p: &str, dir: &Path| {
        vec![
            format!("com.docker.compose.project=muvee-{p}"),
            format!("com.docker.compose.project.working_dir={}", dir.display()),
        ]
    };
    let claims = |l: &mut Vec<String>, node: Option<&str>| {
        l.extend([
            "muvee.managed=true".into(),
            format!("muvee.domain_prefix={victim}"),
        ]);
        l.extend(node.map(|n| format!("muvee.node={n}")));
    };
    // The victim: a compose app this node staged, deployed before services carried muvee.node.
    let mut l = project(&victim, &staged.join("src"));
    claims(&mut l, None);
    labelled_container(&format!("muvee-{victim}-web-1"), "victim", &l);
    // Another tenant's service whose compose file claims the victim's app and this node.
    let mut l = project(&evil, &home.join("data/compose").join(&evil).join("src"));
    claims(&mut l, Some(&node));
    let evil_side = format!("muvee-{evil}-side-1");
    labelled_container(&evil_side, "attacker", &l);
    // The victim's project name, run from elsewhere.
    let mut l = project(&victim, &home.join("elsewhere"));
    claims(&mut l, Some(&node));
    let forged = format!("muvee-{victim}-forged-1");
    labelled_container(&forged, "forger", &l);
    let cp = FakeCp::start(Version::Today, SECRET);
    let _agent = TestAgent::builder("deploy")
        .cp(&cp)
        .real_docker()
        .dir(&home)
        .env("POLL_INTERVAL", "1s")
        .env("NODE_NAME", &node)
        .start();
    let ws = cp.control().accept(Duration::from_secs(30)).expect("dial");
    let who = ["sh", "-c", "echo who=$WHO"];
    for s in ["p1", "p2", "p3"] {
        ws.send(
            &json!({"type": "open_exec", "session": s, "domain_prefix": victim,
                        "container": format!("muvee-{victim}"), "cmd": who}),
        )
        .unwrap();
        let o = ws.outcome(s, FRAME_WAIT).expect("ended");
        let out = String::from_utf8_lossy(&o.output);
        assert!(out.contains("who=victim"), "{s}: {o:?}");
    }
    for (s, name) in [("n1", &evil_side), ("n2", &forged)] {
        ws.open_exec(s, name, &who).unwrap();
        let o = ws.outcome(s, FRAME_WAIT).expect("ended");
        assert_eq!(o.kinds, ["error"], "{s}: {o:?}");
        assert!(
            o.end["msg"].as_str().unwrap().contains("this node's apps"),
            "{o:?}"
        );
    }
    ws.open_exec("n3", &format!("muvee-{victim}-web-1"), &who)
        .unwrap();
    let o = ws.outcome("n3", FRAME_WAIT).expect("ended");
    assert!(
        String::from_utf8_lossy(&o.output).contains("who=victim"),
        "{o:?}"
    );
}

#[test]
fn close_and_a_dropped_channel_kill_the_process_inside_the_container() {
    if !require_docker(test_name!()) {
        return;
    }
    let bed = Bed::start();
    let ws = bed.accept(20);
    let c = bed.container.as_str();
    // A plain process, and one with a child of its own.
    ws.open_exec("k1", c, &["sleep", "7777"]).unwrap();
    ws.open_exec("k2", c, &["sh", "-c", "sleep 7778; echo never"])
        .unwrap();
    // One that leaves its group and session and drops the marker from its environment.
    let escape = "setsid env -i sleep 7782 & exec sleep 7783";
    ws.open_exec("k4", c, &["sh", "-c", escape]).unwrap();
    let all = || {
        let t = top(c);
        ["sleep 7777", "sleep 7778", "sleep 7782", "sleep 7783"]
            .iter()
            .all(|p| t.contains(p))
    };
    assert!(util::poll(20, all), "{}", top(c));
    // One at a time: `outcome` drops the other sessions' frames.
    for s in ["k1", "k2", "k4"] {
        ws.close_session(s).unwrap();
        let o = ws.outcome(s, FRAME_WAIT).expect("ended");
        assert_eq!(o.end["code"], -1, "{}", o.end);
    }
    let t = top(c);
    let left = ["sleep 7777", "sleep 7778", "sleep 7782", "sleep 7783"];
    assert!(
        !left.iter().any(|p| t.contains(p)),
        "left running after close:\n{t}"
    );

    // A second open with a running session's id: the server ends the session on the
    // `error`, so the running process must not outlive it.
    ws.open_exec("k5", c, &["sleep", "7784"]).unwrap();
    assert!(
        util::poll(20, || top(c).contains("sleep 7784")),
        "{}",
        top(c)
    );
    ws.open_exec("k5", c, &["echo", "second"]).unwrap();
    let o = ws.outcome("k5", FRAME_WAIT).expect("ended");
    assert_eq!(o.kinds, ["error"], "{o:?}");
    assert!(
        util::poll(15, || !top(c).contains("sleep 7784")),
        "left running after a duplicate open:\n{}",
        top(c)
    );

    // The channel drops (the control plane went away): the same.
    ws.open_exec("k3", c, &["sleep", "7779"]).unwrap();
    assert!(
        util::poll(20, || top(c).contains("sleep 7779")),
        "{}",
        top(c)
    );
    ws.disconnect();
    assert!(
        util::poll(15, || !top(c).contains("sleep 7779")),
        "left running after the channel dropped:\n{}",
        top(c)
    );
}

#[test]
fn big_or_unread_input_ends_the_session_with_an_error_and_memory_stays_bounded() {
    if !require_docker(test_name!()) {
        return;
    }
    let docker = slow_docker();
    let bed = Bed::start_with(None, &[("DOCKER_CLI", docker.to_str().unwrap())]);
    let ws = bed.accept(20);
    let c = bed.container.as_str();

    // 20 frames of 4 MiB into a program that reads nothing: each is refused at once.
    ws.open_exec("b1", c, &["sleep", "7781"]).unwrap();
    let big = vec![b'x'; 4 << 20];
    for _ in 0..20 {
        ws.stdin("b1", &big).unwrap();
    }
    let b1 = ws.outcome("b1", FRAME_WAIT).expect("b1 ended");
    assert_eq!(b1.end["type"], "error", "{}", b1.end);
    assert!(
        b1.end["msg"].as_str().unwrap().contains("larger than"),
        "{}",
        b1.end
    );

    // Frames that fit, faster than the program reads them (it reads none).
    let deaf = docker.with_file_name("deaf-exec");
    std::fs::write(&deaf, "").unwrap();
    ws.open_exec("b2", c, &["sleep", "7782"]).unwrap();
    let mib = vec![b'y'; 1 << 20];
    for _ in 0..16 {
        ws.stdin("b2", &mib).unwrap();
    }
    let b2 = ws.outcome("b2", FRAME_WAIT).expect("b2 ended");
    assert_eq!(b2.end["type"], "error", "{}", b2.end);
    assert!(
        b2.end["msg"].as_str().unwrap().contains("faster than"),
        "{}",
        b2.end
    );
    std::fs::remove_file(&deaf).unwrap();
    let peak = peak_rss_kib(bed.agent.child.id());
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
    // The first session was ended: its process too.
    assert!(
        util::poll(15, || !top(c).contains("sleep 7781")),
        "{}",
        top(c)
    );

    // At most 16 sessions at once: the 17th is refused, and closing one makes room.
    for i in 0..17 {
        ws.open_exec(&format!("m{i}"), c, &["sleep", "7783"])
            .unwrap();
    }
    let m16 = ws.outcome("m16", FRAME_WAIT).expect("m16 ended");
    assert_eq!(m16.kinds, ["error"], "{}", m16.end);
    assert!(
        m16.end["msg"].as_str().unwrap().contains("16"),
        "{}",
        m16.end
    );
    ws.close_session("m0").unwrap();
    assert_eq!(
        ws.outcome("m0", FRAME_WAIT).expect("m0 ended").end["code"],
        -1
    );
    ws.open_exec("m17", c, &["echo", "room"]).unwrap();
    let m17 = ws.outcome("m17", FRAME_WAIT).expect("m17 ended");
    assert!(
        String::from_utf8_lossy(&m17.output).contains("room"),
        "{m17:?}"
    );
    // The others' exits come in any order.
    let mut open: Vec<String> = (1..16).map(|i| format!("m{i}")).collect();
    for s in &open {
        ws.close_session(s).unwrap();
    }
    while let Some(f) = ws.recv(FRAME_WAIT) {
        if f["type"] == "exit" {
            assert_eq!(f["code"], -1, "{f}");
            open.retain(|s| f["session"] != s.as_str());
        }
        if open.is_empty() {
            break;
        }
    }
    assert!(open.is_empty(), "no exit for {open:?}");
}

/// A docker CLI that is the real one, made slow where a test asks: `ps` sleeps 10 s while the
/// file `slow-ps` exists next to it (a slow daemon), `cp - …` takes its input at about
/// 2 MiB/s (a container whose disk is slower than the network), and while `deaf-exec` exists
/// `exec -ti …` is a program here that never reads its input (flooding a real container's
/// TTY wedges docker 20.10 when the container is removed later: seen on the test engine).
fn slow_docker() -> PathBuf {
    let dir = temp_dir("slow-docker");
    let script = format!(
        "#!/bin/sh\n\
         real={real}\n\
         if [ \"$1\" = ps ] && [ -e {dir}/slow-ps ]; then sleep 10; fi\n\
         if [ \"$1 $2\" = \"exec -ti\" ] && [ -e {dir}/deaf-exec ]; then exec sleep 600; fi\n\
         if [ \"$1\" = cp ] && [ \"$2\" = - ]; then\n\
           while n=$(dd bs=65536 count=1 iflag=fullblock 2>/dev/null | tee /dev/fd/3 | wc -c) && [ \"$n\" -gt 0 ]; do sleep 0.03; done 3>&1 | \"$real\" \"$@\"\n\
           exit $?\n\
         fi\n\
         exec \"$real\" \"$@\"\n",
        real = crate::test_agent::which(&util::docker_cli()),
        dir = dir.display()
    );
    let path = dir.join("docker");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// An engine that answers the docker CLI's first resize of each exec `hold` late (a busy
/// daemon): a proxy in front of the engine's socket that holds that request back. Its
/// address, for DOCKER_HOST.
fn engine_slow_to_size_ttys(hold: Duration) -> String {
    let path = temp_dir("slow-resize").join("docker.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let engine = match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => h["unix://".len()..].to_string(),
        _ => "/var/run/docker.sock".to_string(),
    };
    let held = Arc::new(Mutex::new(HashSet::new()));
    std::thread::spawn(move || {
        for cli in listener.incoming().flatten() {
            let Ok(daemon) = UnixStream::connect(&engine) else {
                continue;
            };
            let (mut from, mut to) = (daemon.try_clone().unwrap(), cli.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
            let held = held.clone();
            std::thread::spawn(move || hold_first_resize(cli, daemon, &held, hold));
        }
    });
    format!("unix://{}", path.display())
}

/// Copies the CLI's requests to the daemon, holding each exec's first resize for `hold`
/// (the CLI writes a request in one piece, so one starts a read).
fn hold_first_resize(
    mut cli: UnixStream,
    mut daemon: UnixStream,
    held: &Mutex<HashSet<String>>,
    hold: Duration,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = cli.read(&mut buf) {
        let head = String::from_utf8_lossy(&buf[..n.min(256)]).into_owned();
        let exec = head
            .strip_prefix("POST /")
            .and_then(|r| r.split_once("/exec/"))
            .and_then(|(_, r)| r.split_once("/resize?"))
            .map(|(id, _)| id.to_string());
        if exec.is_some_and(|id| held.lock().unwrap().insert(id)) {
            std::thread::sleep(hold);
        }
        if daemon.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = daemon.shutdown(Shutdown::Write);
}

/// The docker CLI ignores SIGWINCH until the engine answered its own first resize (made with
/// the size the PTY had then): a resize in that window must reach the container all the same
/// (seen on a loaded machine, where that answer took seconds).
#[test]
fn a_resize_reaches_the_container_while_the_engine_is_slow_to_size_the_tty() {
    if !require_docker(test_name!()) {
        return;
    }
    let host = engine_slow_to_size_ttys(Duration::from_secs(4));
    let bed = Bed::start_with(None, &[("DOCKER_HOST", &host)]);
    let ws = bed.accept(20);
    ws.open_exec("r1", &bed.container, &["sh"]).unwrap();
    ws.stdin("r1", b"echo typed-$((6*7))\n").unwrap();
    if let Err(seen) = read_until(&ws, "r1", "typed-42", FRAME_WAIT) {
        panic!("r1: no typed-42: {seen:?}");
    }
    ws.resize("r1", 77, 11).unwrap();
    if let Err(seen) = ask_size_until(&ws, "r1", "11 77") {
        panic!("r1: never 11 77: {seen:?}");
    }
}

#[test]
fn an_upload_into_a_slow_container_slows_down_instead_of_failing() {
    if !require_docker(test_name!()) {
        return;
    }
    let docker = slow_docker();
    let bed = Bed::start_with(None, &[("DOCKER_CLI", docker.to_str().unwrap())]);
    let ws = bed.accept(20);
    // 16 MiB, sent as fast as the socket takes it: twice what the Go agent's 256-frame inbox
    // held.
    let src = temp_dir("cp-slow");
    let blob: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &blob).unwrap();
    let tar = tar_of(&src, "big.bin");
    let t0 = Instant::now();
    ws.open_cp("u1", &bed.container, "/tmp", "up").unwrap();
    ws.upload("u1", &tar).unwrap();
    let u1 = ws.outcome("u1", Duration::from_secs(60)).expect("u1 ended");
    assert_eq!(
        u1.end,
        json!({"type": "exit", "session": "u1"}),
        "{:?}",
        u1.kinds
    );
    let took = t0.elapsed();
    assert!(
        took > Duration::from_secs(4),
        "the throttle did not hold: {took:?}"
    );
    let sum = |cmd: &mut Command| util::sh(cmd).split_whitespace().next().unwrap().to_string();
    let here = sum(Command::new("sha256sum").arg(src.join("big.bin")));
    let there = sum(Command::new(util::docker_cli()).args([
        "exec",
        &bed.container,
        "sha256sum",
        "/tmp/big.bin",
    ]));
    assert_eq!(here, there);
    let peak = peak_rss_kib(bed.agent.child.id());
    assert!(peak < 64 * 1024, "agent peak RSS {peak} KiB");
}

#[test]
fn a_slow_docker_daemon_does_not_stop_other_sessions() {
    if !require_docker(test_name!()) {
        return;
    }
    let docker = slow_docker();
    let bed = Bed::start_with(None, &[("DOCKER_CLI", docker.to_str().unwrap())]);
    let ws = bed.accept(20);
    ws.open_exec("a", &bed.container, &["sh"]).unwrap();
    ws.stdin("a", b"echo one-$((1+1))\n").unwrap();
    if let Err(seen) = read_until(&ws, "a", "one-2", FRAME_WAIT) {
        panic!("a: no one-2: {seen:?}");
    }
    // From now on every `docker ps` takes 10 s: a session opened by prefix resolves slowly...
    std::fs::write(docker.with_file_name("slow-ps"), "").unwrap();
    ws.send(
        &json!({"type": "open_exec", "session": "b", "domain_prefix": bed.prefix(),
                    "container": bed.container, "cmd": ["true"]}),
    )
    .unwrap();
    // ... while the open session answers at once.
    ws.stdin("a", b"echo two-$((2+2))\n").unwrap();
    if let Err(seen) = read_until(&ws, "a", "two-4", Duration::from_secs(4)) {
        panic!("a: no two-4 within 4 s while b resolved: {seen:?}");
    }
    let b = ws.outcome("b", FRAME_WAIT).expect("b ended");
    assert_eq!(b.end, json!({"type": "exit", "session": "b"}));
    std::fs::remove_file(docker.with_file_name("slow-ps")).unwrap();
}

#[test]
fn a_server_that_says_hello_and_closes_is_not_redialled_every_second() {
    if !require_docker(test_name!()) {
        return;
    }
    let bed = Bed::start();
    let first = bed.accept(20);
    bed.cp.control().set_upgrade(Upgrade::HelloThenClose);
    first.disconnect();
    let dials = || bed.cp.requests_to("/api/agent/control").len();
    let before = dials();
    std::thread::sleep(Duration::from_secs(8));
    // Backoff 1, 2, 4 s: dials at about 1, 3 and 7 s (a reset on hello: one a second).
    let n = dials() - before;
    assert!((2..=3).contains(&n), "{n} dials in 8 s");
}

#[test]
fn an_https_control_plane_gets_exec_over_wss_with_its_own_ca() {
    if !require_docker(test_name!()) {
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_file = temp_dir("tls-ca").join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    // The fake control plane behind an https front: the agent registers, polls and dials
    // the control channel through it.
    let cp = FakeCp::start(Version::Today, SECRET);
    let front = tls::TlsFront::start(
        "127.0.0.1:0",
        vec![leaf.der().clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        format!("127.0.0.1:{}", cp.port()),
    )
    .unwrap();
    let node = node_name();
    let (container, _cleanup) = idle_container(&node);
    let agent = TestAgent::builder("deploy")
        .url(&format!("https://localhost:{}", front.port))
        .real_docker()
        .env("NODE_NAME", &node)
        .env("CONTROL_PLANE_CA_FILE", ca_file.to_str().unwrap())
        .start();
    let Some(ws) = cp.control().accept(Duration::from_secs(20)) else {
        panic!(
            "the agent never dialled the control channel over wss:\n{}",
            agent.log()
        );
    };
    ws.open_exec("t1", &container, &["echo", "over-tls"])
        .unwrap();
    let t1 = ws.outcome("t1", FRAME_WAIT).expect("t1 ended");
    assert!(
        String::from_utf8_lossy(&t1.output).contains("over-tls"),
        "{t1:?}"
    );
    assert_eq!(t1.end, json!({"type": "exit", "session": "t1"}));
}
