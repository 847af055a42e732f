//! Shared helpers for the integration tests: the built binary, temp dirs, unique ids, the
//! Docker test bed (skip loudly, or fail when MUVEE_REQUIRE_DOCKER=1), and an argv sampler
//! that proves secrets never reach /proc/*/cmdline.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The name of the test function it is written in, so a test never spells its own name.
macro_rules! test_name {
    () => {{
        fn here() {}
        let path = std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}
pub(crate) use test_name;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_muvee-agent"))
}

/// Removes the temp dirs of earlier test runs (their pid is gone), so /tmp does not grow.
fn sweep_old_temp_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("muvee-agent-it-") else {
            continue;
        };
        let pid = rest.rsplit('-').nth(1).unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh, unique directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_old_temp_dirs);
    let d = std::env::temp_dir().join(format!(
        "muvee-agent-it-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Unique lowercase hex, so parallel tests never share a project, token or marker.
pub fn unique_hex() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut x = t
        ^ (u128::from(std::process::id()) << 64)
        ^ ((N.fetch_add(1, Ordering::SeqCst) as u128) << 100);
    // Mix the bits (xorshift-multiply) so values look random rather than mostly zeros.
    for _ in 0..2 {
        x ^= x >> 67;
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    }
    format!("{x:032x}")
}

/// A unique v4 UUID (lowercase, hyphenated).
pub fn new_uuid() -> String {
    let h = unique_hex();
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Standard (padded) base64, as in HTTP Basic auth.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn docker_cli() -> String {
    std::env::var("MUVEE_TEST_DOCKER_CLI").unwrap_or_else(|_| "docker".into())
}

/// Runs the test Docker CLI with `args` (and `env` added) to completion; any exit status.
pub fn docker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(docker_cli());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn base_image() -> String {
    std::env::var("MUVEE_TEST_BASE_IMAGE").unwrap_or_else(|_| "muvee-test/busybox:latest".into())
}

/// True when a Docker engine and the test base image are available. Otherwise the test is
/// skipped with a loud message, or fails when MUVEE_REQUIRE_DOCKER=1 (CI).
pub fn require_docker(test: &str) -> bool {
    let ok = Command::new(docker_cli())
        .args(["image", "inspect", "--format", "{{.Id}}", &base_image()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let msg = format!(
        "no Docker engine with image {} (run `scripts/testbed.sh up`)",
        base_image()
    );
    if std::env::var("MUVEE_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("{test}: MUVEE_REQUIRE_DOCKER=1 but {msg}");
    }
    eprintln!("SKIPPED {test}: {msg}");
    false
}

/// Removes, when dropped, the containers, networks and volumes that match a `docker ps`
/// filter (`name=…` or `label=…`): a test's objects go whatever happens to the test. Never
/// panics: there may be no engine, or the test is already failing.
pub struct RemoveContainers(String);

impl RemoveContainers {
    /// Containers whose name contains `part`.
    pub fn named(part: &str) -> RemoveContainers {
        RemoveContainers(format!("name={part}"))
    }

    /// Objects with this `key=value` label.
    pub fn labelled(label: &str) -> RemoveContainers {
        RemoveContainers(format!("label={label}"))
    }
}

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        let ids = |args: &[&str]| -> Vec<String> {
            let mut c = Command::new(docker_cli());
            c.args(args).args(["-q", "--filter", &self.0]);
            let out = c.output().map(|o| o.stdout).unwrap_or_default();
            let text = String::from_utf8_lossy(&out);
            text.split_whitespace().map(String::from).collect()
        };
        let remove = |args: &[&str], ids: Vec<String>| {
            if !ids.is_empty() {
                let _ = Command::new(docker_cli()).args(args).args(ids).output();
            }
        };
        remove(&["rm", "-f", "-v"], ids(&["ps", "-a"]));
        remove(&["network", "rm"], ids(&["network", "ls"]));
        remove(&["volume", "rm", "-f"], ids(&["volume", "ls"]));
    }
}

/// The password-protected test registry.
pub struct Registry {
    pub addr: String,
    pub user: String,
    pub password: String,
}

pub fn registry() -> Registry {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    Registry {
        addr: env("MUVEE_TEST_REGISTRY", "127.0.0.1:5000"),
        user: env("MUVEE_TEST_REGISTRY_USER", "muvee-test"),
        password: env("MUVEE_TEST_REGISTRY_PASSWORD", "registry-pw-4c8e1f"),
    }
}

/// A fresh DOCKER_CONFIG dir logged in to the test registry (the password on stdin).
pub fn registry_login() -> PathBuf {
    use std::io::Write;
    let reg = registry();
    let dir = temp_dir("registry-login");
    let mut child = Command::new(docker_cli())
        .env("DOCKER_CONFIG", &dir)
        .args(["login", &reg.addr, "-u", &reg.user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    stdin.unwrap().write_all(reg.password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "docker login: {}", describe(&out));
    dir
}

/// Runs a command to completion and panics with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `muvee-agent run-task` with a task (or payload) on stdin. `env` is added to a clean
/// environment that keeps PATH/HOME; DATA_DIR and DOCKER_CONFIG default to fresh temp dirs.
pub fn run_task(args: &[&str], input: &str, env: &[(&str, &str)]) -> Output {
    run_task_under(&[], args, input, env)
}

/// `run_task` with the agent run under `wrapper` (e.g. strace).
pub fn run_task_under(
    wrapper: &[&str],
    args: &[&str],
    input: &str,
    env: &[(&str, &str)],
) -> Output {
    use std::io::Write;
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    cmd.arg("run-task").args(args);
    let data = temp_dir("data");
    let dcfg = temp_dir("dockercfg");
    cmd.env("DATA_DIR", &data).env("DOCKER_CONFIG", &dcfg);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn muvee-agent");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Samples every process's argv every 20 ms until stopped; returns all distinct argvs seen.
pub struct ArgvSampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ArgvSampler {
    pub fn start() -> ArgvSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for argv in all_cmdlines() {
                    let mut v = v.lock().unwrap();
                    if !v.contains(&argv) {
                        v.push(argv);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ArgvSampler {
            stop,
            seen,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

fn all_cmdlines() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|b| !b.is_empty())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .collect()
}

/// Every file under `dir` whose bytes contain `needle` (to prove no secret is left behind).
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if md.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

/// HTTP GET to 127.0.0.1:port with a short timeout; returns the body on any HTTP answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    if !buf.starts_with("HTTP/") {
        return None;
    }
    Some(
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// Polls `cond` every 50 ms for up to `secs`; false when it never held.
pub fn poll(secs: u64, cond: impl FnMut() -> bool) -> bool {
    poll_for(Duration::from_secs(secs), cond)
}

/// Polls `cond` every 50 ms for up to `timeout`; false when it never held.
pub fn poll_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Sends `sig` to `pid` (negative: a process group) through libc, never through the `kill`
/// binary: procps-ng 4.0.2 parses `kill -9 -1234` as `kill(-1, SIGKILL)` and takes down every
/// process on the machine. A pid of 0 or -1 is refused for the same reason.
pub fn signal(pid: i32, sig: i32) {
    assert!(pid != 0 && pid != -1, "refusing to signal pid {pid}");
    // SAFETY: plain syscall with integer arguments.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Makes this test process the reaper of orphans (shims left by a killed agent), so they are
/// never reparented to the machine's PID 1.
pub fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: prctl with integer arguments; affects only this process.
    ONCE.call_once(|| unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    });
}
