//! The deploy role's control channel (protocol §1.10) against the dev control plane's
//! WebSocket side (`examples/dev-cp/control.rs`): `exec` and `cp` sessions on a real
//! container, and the channel coming back after the node or the connection is lost.

use crate::deployer::{images, IDLE};
use crate::dev_cp::DevCp;
use crate::fake_cp::{frame_data, ControlConn, FakeCp, Version};
use crate::test_agent::{TestAgent, SECRET};
use crate::util::{self, require_docker, temp_dir, test_name, RemoveContainers};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `docker exec -ti` sizes the container's TTY just after the process starts: wait for it.
const WAIT_SIZE: &str = "i=0; while [ $i -lt 100 ]; do s=$(stty size 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != \"0 0\" ] && break; i=$((i+1)); sleep 0.1; done; echo \"size=$s\"; exit 3";
const FRAME_WAIT: Duration = Duration::from_secs(20);

/// A deploy agent on today's control plane, and the container its sessions reach.
struct Bed {
    cp: FakeCp,
    container: String,
    _agent: TestAgent,
    _cleanup: RemoveContainers,
}

/// A running container of ours (prefix: its name without `muvee-`), removed when the guard
/// is dropped.
fn idle_container() -> (String, RemoveContainers) {
    images();
    let container = format!(
        "muvee-itx-{}-{}",
        std::process::id(),
        &util::unique_hex()[..6]
    );
    let cleanup = RemoveContainers::named(&container);
    util::sh(Command::new(util::docker_cli()).args([
        "run",
        "-d",
        "--name",
        &container,
        "--label",
        &format!("muvee.domain_prefix={}", &container[6..]),
        IDLE,
    ]));
    (container, cleanup)
}

impl Bed {
    fn start() -> Bed {
        let (container, cleanup) = idle_container();
        let cp = FakeCp::start(Version::Today, SECRET);
        let agent = TestAgent::builder("deploy")
            .cp(&cp)
            .real_docker()
            .env("POLL_INTERVAL", "1s")
            .start();
        Bed {
            cp,
            container,
            _agent: agent,
            _cleanup: cleanup,
        }
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
    let prefix = &bed.container[6..];
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
    // The new size reaches the container later than typed input (SIGWINCH to docker, then
    // the engine's API): a `stty size` typed at once may print the old one. Ask again, as a
    // person would.
    let mut seen = Vec::new();
    let resized = (0..10).any(|_| {
        ws.stdin("s3", b"stty size\n").unwrap();
        read_until(&ws, "s3", "11 77", Duration::from_secs(1))
            .map_err(|s| seen.push(s))
            .is_ok()
    });
    assert!(resized, "s3: never 11 77: {seen:?}");
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

    // A missing path: docker's error text on stderr and its exit code.
    ws.open_cp("d2", &bed.container, "/no/such", "down")
        .unwrap();
    let d2 = ws.outcome("d2", FRAME_WAIT).expect("d2 ended");
    assert!(!d2.output.is_empty() && d2.end["code"] != 0, "{}", d2.end);

    // The server drops the connection: the agent dials again (backoff reset by hello).
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
    let (container, _cleanup) = idle_container();
    let server = DevCp::serve(SECRET, &[]);
    let _agent = TestAgent::builder("deploy")
        .url(&server.url)
        .real_docker()
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
