//! The host side of a campaign: its directory under target/chaos, a small tmpfs DATA_DIR per
//! agent (blocks and inodes limited, filled and freed by the disk faults), the git repository
//! builds clone, the NFS base paths, the app image, the docker CLI wrapper's rules and the
//! registry proxy. Everything made here is undone by [`Bed::teardown`], and what an
//! interrupted earlier campaign left is swept at the next start.

use crate::plan::Role;
use crate::proxy::Proxy;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/chaos");
pub const WRAPPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chaos-docker");

/// The app every deploy runs (builds produce the same): it appends "<container id> <marker>"
/// to its workspace at each start (the checker counts containers per deployment), then
/// serves its marker; CRASH makes it exit (printing its token), SLOW makes it late.
const APP_CMD: &str = r#"CMD ["sh", "-c", "echo \"$(hostname) $MARKER\" >> /workspace/starts; if [ -n \"$CRASH\" ]; then echo \"crashing, token $API_TOKEN\" >&2; exit 3; fi; sleep ${SLOW:-0}; mkdir -p /www; echo \"$MARKER\" > /www/index.html; exec httpd -f -p 8080 -h /www"]"#;

#[derive(Debug)]
pub enum SetupError {
    Io(String, std::io::Error),
    Cmd(String, String),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Io(what, e) => write!(f, "{what}: {e}"),
            SetupError::Cmd(what, out) => write!(f, "{what} failed: {out}"),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let what = what.into();
    move |e| SetupError::Io(what, e)
}

/// Runs a command to completion within `limit` (killed after it): a hung engine must not
/// hang the campaign.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            crate::agents::signal(pid, libc::SIGKILL);
            let what = format!("no answer within {}s", limit.as_secs());
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
        }
    }
}

/// Runs a command to completion (2 minutes at most); its stdout, or an error with its output.
pub fn sh(cmd: &mut Command) -> Result<String, SetupError> {
    let what = format!("{cmd:?}");
    let out = output_within(cmd, Duration::from_secs(120)).map_err(io(&what))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        return Err(SetupError::Cmd(what, text.trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn docker() -> Command {
    Command::new("docker")
}

/// A docker call of the campaign's own (30 s at most); its stdout, empty on any failure.
pub fn docker_out(args: &[&str]) -> String {
    let out = output_within(docker().args(args), Duration::from_secs(30));
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub struct Registry {
    pub upstream: String,
    pub user: String,
    pub password: String,
}

impl Registry {
    pub fn from_env() -> Registry {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        Registry {
            upstream: env("MUVEE_TEST_REGISTRY", "127.0.0.1:5000"),
            user: env("MUVEE_TEST_REGISTRY_USER", "muvee-test"),
            password: env("MUVEE_TEST_REGISTRY_PASSWORD", "registry-pw-4c8e1f"),
        }
    }
}

pub struct Bed {
    pub dir: PathBuf,
    /// Unique per run (names of nodes, apps and images), unlike the seed.
    pub run: String,
    pub repo: PathBuf,
    pub datasets: PathBuf,
    pub volumes: PathBuf,
    /// The root of each role's DATA_DIR filesystem (a tmpfs when `mounted`).
    fs: [PathBuf; 2],
    pub mounted: bool,
    pub docker_log: PathBuf,
    docker_ctl: PathBuf,
    docker_rules: Mutex<Vec<(usize, String)>>,
    disk_faults: [Mutex<usize>; 2],
    pub registry: Registry,
    pub proxy: Proxy,
    pub app_image: String,
    pub base_image: String,
    /// The docker CLI the wrapper runs, and whether it builds with BuildKit (`--secret`).
    pub docker_cli: String,
    pub buildkit: bool,
}

fn idx(role: Role) -> usize {
    match role {
        Role::Builder => 0,
        Role::Deploy => 1,
    }
}

impl Bed {
    pub fn setup(seed: u64, run: &str) -> Result<Bed, SetupError> {
        let (docker_cli, buildkit) = docker_client(seed);
        sweep_stale();
        let dir = Path::new(ROOT).join(format!("seed-{seed}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).map_err(io("create the campaign dir"))?;
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(io(format!("write {name}")))
        };
        write("runner.pid", std::process::id().to_string())?;
        write("run", run.to_string())?;
        let registry = Registry::from_env();
        let proxy = Proxy::start(&registry.upstream).map_err(io("start the registry proxy"))?;
        write("proxy", proxy.addr.to_string())?;
        let base_image = std::env::var("MUVEE_TEST_BASE_IMAGE")
            .unwrap_or_else(|_| "muvee-test/busybox:latest".into());
        let mut bed = Bed {
            repo: dir.join("repo"),
            datasets: dir.join("nfs/datasets"),
            volumes: dir.join("nfs/volumes"),
            fs: [dir.join("builder-fs"), dir.join("deploy-fs")],
            mounted: false,
            docker_log: dir.join("logs/docker-calls.log"),
            docker_ctl: dir.join("docker.ctl"),
            docker_rules: Mutex::default(),
            disk_faults: Default::default(),
            app_image: format!("{}/chaos-{run}-app:1", proxy.addr),
            registry,
            proxy,
            base_image,
            run: run.to_string(),
            dir,
            docker_cli,
            buildkit,
        };
        bed.mounted = bed.mount_data_dirs();
        bed.write_docker_rules();
        let made = bed
            .make_repo()
            .and_then(|()| bed.make_datasets())
            .and_then(|()| bed.build_app_image());
        match made {
            Ok(()) => Ok(bed),
            Err(e) => {
                bed.teardown();
                Err(e)
            }
        }
    }

    pub fn data_dir(&self, role: Role) -> PathBuf {
        self.fs[idx(role)].join("data")
    }

    pub fn node_name(&self, role: Role) -> String {
        format!("chaos-{}-{}", self.run, role.name())
    }

    /// A tmpfs per role: small in blocks and inodes, so the disk faults fill it at once.
    fn mount_data_dirs(&self) -> bool {
        let mut all = true;
        for (fs, size) in self.fs.iter().zip(["32m", "48m"]) {
            let opts = format!("size={size},nr_inodes=4000,mode=0755");
            let mounted = std::fs::create_dir_all(fs).is_ok()
                && Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &opts, "chaos-tmpfs"])
                    .arg(fs)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            all &= mounted;
        }
        if !all {
            println!(
                "chaos: cannot mount a tmpfs (not root?): DATA_DIR on the disk, no disk faults"
            );
        }
        all
    }

    fn make_repo(&self) -> Result<(), SetupError> {
        std::fs::create_dir_all(&self.repo).map_err(io("create the git repo"))?;
        sh(Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .arg(&self.repo))?;
        for (k, v) in [
            ("user.email", "chaos@localhost"),
            ("user.name", "chaos"),
            ("commit.gpgsign", "false"),
        ] {
            sh(self.git().args(["config", k, v]))?;
        }
        Ok(())
    }

    fn git(&self) -> Command {
        let mut c = Command::new("git");
        c.arg("-C").arg(&self.repo);
        c
    }

    /// Commits a build's Dockerfile (RUN `script`) and a nonce on branch `branch`.
    pub fn commit_build(&self, branch: &str, run: &str) -> Result<(), SetupError> {
        let dockerfile = format!(
            "FROM {}\nSTOPSIGNAL SIGKILL\nCOPY nonce /nonce\n{run}\n{APP_CMD}\n",
            self.base_image
        );
        std::fs::write(self.repo.join("Dockerfile"), dockerfile).map_err(io("write Dockerfile"))?;
        // Unique per run: BuildKit would take an earlier run's RUN step from its cache.
        let nonce = format!("{} {branch}\n", self.run);
        std::fs::write(self.repo.join("nonce"), nonce).map_err(io("write nonce"))?;
        sh(self.git().args(["add", "-A"]))?;
        sh(self.git().args(["commit", "-q", "-m", branch]))?;
        sh(self.git().args(["branch", "-f", branch]))?;
        Ok(())
    }

    fn make_datasets(&self) -> Result<(), SetupError> {
        for k in 0..crate::plan::DATASETS {
            let d = self.datasets.join(format!("ds{k}"));
            std::fs::create_dir_all(&d).map_err(io("create a dataset"))?;
            std::fs::write(d.join("file.txt"), format!("dataset ds{k}\n"))
                .map_err(io("write a dataset"))?;
            let blob = vec![k as u8; 1536 * 1024];
            std::fs::write(d.join("blob.bin"), blob).map_err(io("write a dataset"))?;
        }
        std::fs::create_dir_all(self.datasets.join("rw")).map_err(io("create a dataset"))?;
        std::fs::create_dir_all(&self.volumes).map_err(io("create the volume base"))
    }

    fn build_app_image(&self) -> Result<(), SetupError> {
        let ctx = self.dir.join("app");
        std::fs::create_dir_all(&ctx).map_err(io("create the app's build context"))?;
        let dockerfile = format!("FROM {}\nSTOPSIGNAL SIGKILL\n{APP_CMD}\n", self.base_image);
        std::fs::write(ctx.join("Dockerfile"), dockerfile).map_err(io("write Dockerfile"))?;
        sh(docker()
            .args(["build", "-q", "-t", &self.app_image])
            .arg(&ctx)
            .env("DOCKER_BUILDKIT", "0"))?;
        Ok(())
    }

    /// Adds a docker CLI fault (`mode secs subs`) until [`Bed::docker_fault_end`].
    pub fn docker_fault(&self, step: usize, rule: String) {
        self.docker_rules.lock().unwrap().push((step, rule));
        self.write_docker_rules();
    }
    pub fn docker_fault_end(&self, step: usize) {
        self.docker_rules.lock().unwrap().retain(|r| r.0 != step);
        self.write_docker_rules();
    }
    pub fn docker_faults_clear(&self) {
        self.docker_rules.lock().unwrap().clear();
        self.write_docker_rules();
    }
    fn write_docker_rules(&self) {
        let rules = self.docker_rules.lock().unwrap();
        let text: String = rules.iter().map(|r| format!("{}\n", r.1)).collect();
        // Renamed into place: the wrapper reads either the old rules or the new ones.
        let tmp = self.docker_ctl.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &self.docker_ctl);
        }
    }
    /// The environment the wrapper (`DOCKER_CLI`) reads.
    pub fn wrapper_env(&self) -> Vec<(String, String)> {
        vec![
            ("DOCKER_CLI".into(), WRAPPER.into()),
            ("CHAOS_REAL_DOCKER".into(), self.docker_cli.clone()),
            (
                "CHAOS_DOCKER_CTL".into(),
                self.docker_ctl.display().to_string(),
            ),
            (
                "CHAOS_DOCKER_LOG".into(),
                self.docker_log.display().to_string(),
            ),
        ]
    }

    /// Fills the role's DATA_DIR filesystem (its blocks, or its inodes) until the last
    /// overlapping disk fault ends.
    pub fn fill(&self, role: Role, inodes: bool) {
        let mut n = self.disk_faults[idx(role)].lock().unwrap();
        *n += 1;
        if !self.mounted {
            return;
        }
        let fs = &self.fs[idx(role)];
        if inodes {
            let d = fs.join("filler-inodes");
            let _ = std::fs::create_dir_all(&d);
            for i in 0..100_000 {
                if std::fs::File::create(d.join(i.to_string())).is_err() {
                    break;
                }
            }
        } else {
            use std::io::Write;
            let chunk = vec![0u8; 1 << 20];
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(fs.join("filler-blocks"));
            if let Ok(mut f) = f {
                while f.write_all(&chunk).is_ok() {}
            }
        }
    }
    pub fn free(&self, role: Role) {
        let mut n = self.disk_faults[idx(role)].lock().unwrap();
        *n = n.saturating_sub(1);
        if *n == 0 {
            let fs = &self.fs[idx(role)];
            let _ = std::fs::remove_dir_all(fs.join("filler-inodes"));
            let _ = std::fs::remove_file(fs.join("filler-blocks"));
        }
    }
    pub fn free_all(&self) {
        for role in [Role::Builder, Role::Deploy] {
            *self.disk_faults[idx(role)].lock().unwrap() = 1;
            self.free(role);
        }
    }

    /// Removes what the campaign made on the engine and the host; keeps the logs, the plan
    /// and the history in `dir`.
    pub fn teardown(&self) {
        self.docker_faults_clear();
        self.free_all();
        self.proxy.stop();
        let clean = undo(&self.dir, &self.run, &self.proxy.addr.to_string());
        let homes = ["home-builder", "home-deploy"].map(|h| self.dir.join(h));
        for d in [&self.repo, &self.dir.join("nfs"), &self.dir.join("app")]
            .into_iter()
            .chain(&homes)
        {
            let _ = std::fs::remove_dir_all(d);
        }
        if clean {
            for fs in &self.fs {
                let _ = std::fs::remove_dir_all(fs);
            }
        }
    }
}

/// The docker CLIs on PATH (a host may have two: e.g. Debian's 20.10 client with BuildKit
/// built in, and a newer one without buildx that builds with the legacy builder); the seed
/// picks one, so campaigns cover both build modes. Returns it and whether it has BuildKit.
fn docker_client(seed: u64) -> (String, bool) {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join("docker");
        let real = std::fs::canonicalize(&p).unwrap_or(p.clone());
        if p.is_file()
            && !found
                .iter()
                .any(|f| std::fs::canonicalize(f).ok() == Some(real.clone()))
        {
            found.push(p);
        }
    }
    let Some(cli) = found.get((seed % found.len().max(1) as u64) as usize) else {
        return ("docker".into(), false);
    };
    let help = Command::new(cli)
        .args(["build", "--help"])
        .env("DOCKER_BUILDKIT", "1")
        .output();
    let buildkit = help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--secret"));
    (cli.display().to_string(), buildkit)
}

/// Containers labelled with one of `nodes`, or named with `name_prefix`.
pub fn our_containers(nodes: &[String], name_prefix: &str) -> Vec<String> {
    let format = "{{.ID}} {{.Names}} {{.Label \"muvee.node\"}}";
    docker_out(&["ps", "-a", "--format", format])
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (id, name, node) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            let ours = nodes.iter().any(|n| n == node) || name.starts_with(name_prefix);
            ours.then(|| format!("{id} {name}"))
        })
        .collect()
}

/// Removes what a run made on the engine and unmounts its tmpfs mounts; true when nothing
/// is left (an engine that does not answer leaves it for the next run's sweep).
fn undo(dir: &Path, run: &str, proxy: &str) -> bool {
    let nodes = [format!("chaos-{run}-deploy")];
    let names = format!("muvee-chaos-{run}");
    let ids: Vec<String> = our_containers(&nodes, &names)
        .iter()
        .filter_map(|c| c.split(' ').next().map(String::from))
        .collect();
    let limit = Duration::from_secs(60);
    if !ids.is_empty() {
        let _ = output_within(docker().args(["rm", "-f"]).args(&ids), limit);
    }
    let app = format!("chaos-{run}-");
    let refs: Vec<String> = docker_out(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .lines()
        .filter(|r| (!proxy.is_empty() && r.starts_with(&format!("{proxy}/"))) || r.contains(&app))
        .map(String::from)
        .collect();
    if !refs.is_empty() {
        let _ = output_within(docker().args(["rmi", "-f"]).args(&refs), limit);
    }
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let clean = mounts_under(dir).is_empty() && our_containers(&nodes, &names).is_empty();
    if clean {
        let _ = std::fs::remove_file(dir.join("runner.pid"));
    } else {
        println!("chaos: could not remove everything of run {run} (does the engine answer?): the next run sweeps it");
    }
    clean
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let points = mounts.lines().filter_map(|l| l.split(' ').nth(1));
    points
        .filter(|m| Path::new(m).starts_with(dir))
        .map(String::from)
        .collect()
}

/// What campaigns killed before their teardown left: their mounts, containers and images.
fn sweep_stale() {
    let Ok(rd) = std::fs::read_dir(ROOT) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        let read = |name: &str| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            text.trim().to_string()
        };
        let pid = read("runner.pid");
        if pid.is_empty() || Path::new("/proc").join(&pid).exists() {
            continue;
        }
        let run = read("run");
        println!(
            "chaos: sweeping what the interrupted run {run} left ({})",
            dir.display()
        );
        undo(&dir, &run, &read("proxy"));
    }
}
