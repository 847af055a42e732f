//! chaos: the agent's fault campaign (`make chaos`, issue 18). Starts the dev control plane
//! (its server core, recording every request, with fault injection), a builder and a deploy
//! agent on the real test bed (Docker engine, registry), feeds them a random workload and a
//! random fault schedule drawn from one seed, then drains, cleans up, shuts down and checks
//! the invariants over the recorded history. A failing run prints the invariant, the task and
//! the schedule around it; the same seed replays the same plan.
//!
//! ```text
//! chaos [--seed N|random] [--duration 3m] [--plan]   (or SEED=, DURATION=; default random, 3m)
//!       --plan: print the seed's plan (workload and faults) and exit
//! CHAOS_AGENT=PATH runs that agent binary instead of target/release/muvee-agent (and
//! CHAOS_BREAK, if set, is passed on to it).
//! ```
//! Exit status: 0 no violation, 1 violations, 2 the campaign could not run, 130 interrupted.

#[path = "../dev-cp/faults.rs"]
mod faults;
#[path = "../dev-cp/server.rs"]
mod server;

mod agents;
mod bed;
mod campaign;
mod check;
mod drive;
mod hist;
mod monitor;
mod plan;
mod polls;
mod proxy;

mod rng;
mod sessions;

use bed::Bed;
use faults::Faults;
use hist::{History, Stop};
use plan::{Plan, Role, PROJECTS};
use rng::Rng;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A task the campaign enqueued.
pub struct TaskRec {
    pub step: usize,
    pub id: String,
    pub kind: String,
    pub project: usize,
    pub deployment: String,
    /// A build: how many numbered lines it prints.
    pub build: Option<u32>,
}

/// Everything the campaign's threads share.
pub struct World {
    pub plan: Plan,
    pub cp: server::Server,
    pub faults: Faults,
    pub bed: Bed,
    pub agents: agents::Agents,
    pub hist: Arc<History>,
    pub stop: Arc<Stop>,
    pub agent_secret: String,
    /// Each project's domain prefix.
    pub names: Vec<String>,
    /// Each project's id, once the control plane made one.
    pub projects: Mutex<Vec<Option<String>>>,
    pub tasks: Mutex<Vec<TaskRec>>,
    /// Markers and secrets (not the schedule: the schedule has streams of its own).
    rng: Mutex<Rng>,
    secrets: AtomicUsize,
    /// The monitor probes the apps (not once the final cleanup removes them).
    pub probing: AtomicBool,
    /// Deploys reported completed whose answer the monitor has not judged yet.
    pub answers_pending: AtomicUsize,
    /// Held by the exec/cp session running (one at a time).
    pub sessions: Mutex<()>,
    /// What of ours was found left before the final cleanup.
    pub leftovers: Mutex<Vec<String>>,
}

impl World {
    pub fn marker(&self) -> String {
        format!("m-{}", self.rng.lock().unwrap().hex(12))
    }
    /// A secret the agent must never show. Every secret starts and ends with a fixed word,
    /// so half of one (a line cut inside it) is found as well as all of it.
    pub fn secret(&self) -> String {
        self.secrets.fetch_add(1, Ordering::SeqCst);
        format!("chaossec{}cessoahc", self.rng.lock().unwrap().hex(24))
    }
    /// How many secrets were handed out (besides the agent secret and registry password).
    pub fn secrets(&self) -> usize {
        self.secrets.load(Ordering::SeqCst) + 2
    }
    pub fn secret_needles(&self) -> Vec<String> {
        vec![
            "chaossec".into(),
            "cessoahc".into(),
            self.bed.registry.password.clone(),
        ]
    }
}

pub fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Args {
    /// Print the plan and exit.
    plan_only: bool,
    seed: u64,
    duration: Duration,
    duration_text: String,
}

fn args() -> Result<Args, String> {
    let mut seed = std::env::var("SEED").ok().filter(|s| !s.is_empty());
    let mut duration = std::env::var("DURATION").ok().filter(|s| !s.is_empty());
    let mut it = std::env::args().skip(1);
    let mut plan_only = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--plan" => plan_only = true,
            "--seed" => seed = it.next(),
            "--duration" => duration = it.next(),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    let seed = match seed.as_deref() {
        None | Some("random") => random_seed(),
        Some(s) => s
            .parse()
            .map_err(|_| format!("SEED {s:?} is not a number"))?,
    };
    let text = duration.unwrap_or_else(|| "3m".into());
    let d = parse_duration(&text).ok_or(format!("DURATION {text:?}: use 90s, 3m or 1h"))?;
    if d < Duration::from_secs(20) {
        return Err(format!("DURATION {text:?} is below 20s"));
    }
    Ok(Args {
        plan_only,
        seed,
        duration: d,
        duration_text: text,
    })
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// A seed from the clock and the pid (printed, so the run can be replayed).
fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(t ^ u64::from(std::process::id()) << 32, 9).next_u64() % 1_000_000_000
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "chaos: seed {} duration {} (replay: make chaos SEED={} DURATION={})",
        a.seed, a.duration_text, a.seed, a.duration_text
    );
    let plan = Plan::new(a.seed, a.duration);
    if a.plan_only {
        plan.steps.iter().for_each(|s| println!("{s}"));
        return ExitCode::SUCCESS;
    }
    if !std::path::Path::new(&agents::agent_bin()).exists() {
        eprintln!(
            "chaos: {} is missing: cargo build --release",
            agents::agent_bin()
        );
        return ExitCode::from(2);
    }
    let run = Rng::new(random_seed(), 4).hex(6);
    let bed = match Bed::setup(a.seed, &run) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("chaos: cannot set up the campaign: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "chaos: run {run}, docker client {} ({}), DATA_DIR {}, work dir {}",
        bed.docker_cli,
        if bed.buildkit {
            "BuildKit"
        } else {
            "legacy builder"
        },
        if bed.mounted {
            "on small tmpfs mounts"
        } else {
            "on the disk"
        },
        bed.dir.display()
    );
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chaos: cannot listen for the control plane: {e}");
            bed.teardown();
            return ExitCode::from(2);
        }
    };
    let w = Arc::new(world(listener, plan, bed, a.seed));
    install_signals(w.stop.clone());
    let code = campaign::run(&w, &a.duration_text);
    w.agents.kill_all();
    w.bed.teardown();
    println!("chaos: logs, plan and history in {}", w.bed.dir.display());
    code
}

fn world(listener: TcpListener, plan: Plan, bed: Bed, seed: u64) -> World {
    let opts = server::Options {
        record: true,
        dev_routes: false,
        log_delay: Duration::ZERO,
        chain_interval: Duration::from_secs(1),
    };
    let mut rng = Rng::new(seed, 3);
    let agent_secret = format!("chaossec{}cessoahc", rng.hex(24));
    let cp = server::Server::serve(listener, server::Version::Today, &agent_secret, opts);
    let faults = Faults::default();
    faults.install(&cp, false);
    // As behind nginx's default `client_max_body_size 1m`.
    faults.limit_body(1 << 20);
    let reg = &bed.registry;
    for (k, v) in [
        ("registry_addr", bed.proxy.addr.to_string()),
        ("registry_user", reg.user.clone()),
        ("registry_password", reg.password.clone()),
        ("dataset_nfs_base_path", bed.datasets.display().to_string()),
        ("volume_nfs_base_path", bed.volumes.display().to_string()),
    ] {
        cp.set_config(k, &v);
    }
    let hist = Arc::new(History::new());
    let env = [Role::Builder, Role::Deploy].map(|r| agent_env(&bed, &cp.url(), &agent_secret, r));
    let agents = agents::Agents::new(env, bed.dir.join("logs"), hist.clone());
    let names = (0..PROJECTS)
        .map(|p| format!("chaos-{}-p{p}", bed.run))
        .collect();
    World {
        plan,
        cp,
        faults,
        agents,
        hist,
        stop: Arc::default(),
        names,
        projects: Mutex::new(vec![None; PROJECTS]),
        tasks: Mutex::default(),
        rng: Mutex::new(rng),
        agent_secret,
        secrets: AtomicUsize::new(0),
        probing: AtomicBool::new(true),
        answers_pending: AtomicUsize::new(0),
        sessions: Mutex::default(),
        leftovers: Mutex::default(),
        bed,
    }
}

/// The agent's environment: short intervals so a few minutes see many rounds.
fn agent_env(bed: &Bed, url: &str, secret: &str, role: Role) -> Vec<(String, String)> {
    let home = bed.dir.join(format!("home-{}", role.name()));
    let _ = std::fs::create_dir_all(&home);
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let mut env: Vec<(String, String)> = [
        ("NODE_ROLE", role.name().to_string()),
        ("CONTROL_PLANE_URL", url.into()),
        ("AGENT_SECRET", secret.into()),
        ("NODE_NAME", bed.node_name(role)),
        ("HOST_IP", "127.0.0.1".into()),
        ("DATA_DIR", bed.data_dir(role).display().to_string()),
        ("POLL_INTERVAL", format!("{}ms", agents::POLL_MS)),
        ("HEARTBEAT_INTERVAL", "5s".into()),
        ("SHUTDOWN_GRACE", format!("{}s", agents::GRACE_SECS)),
        ("MAX_CONCURRENT_TASKS", agents::MAX_TASKS.to_string()),
        ("DEPLOY_DRAIN", "1s".into()),
        ("DEPLOY_HEALTH_TIMEOUT", "10s".into()),
        ("REAP_GRACE", "1m".into()),
        ("MAX_STORAGE", "8M".into()),
        ("LOG_SPILL_MAX", "8M".into()),
        ("MUVEE_LOG", "info".into()),
        ("PATH", path),
        ("HOME", home.display().to_string()),
        ("DOCKER_CONFIG", home.join("docker").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(bed.wrapper_env());
    // For a deliberately broken build (CHAOS_AGENT), whatever switches its breakage.
    if let Ok(b) = std::env::var("CHAOS_BREAK") {
        env.push(("CHAOS_BREAK".into(), b));
    }
    env
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static buffer.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// SIGINT/SIGTERM stop the campaign, which then cleans up: the handler only writes to a
/// pipe; a thread turns that into [`Stop::stop`].
fn install_signals(stop: Arc<Stop>) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs a handler that only calls write(2).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into a local buffer from our own pipe.
        unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        println!("chaos: interrupted: stopping and cleaning up");
        stop.stop();
    });
}
