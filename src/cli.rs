//! Command-line flags (argh). Every environment variable has a flag; the flag wins.
//! Resolution and validation live in `config.rs`.

use argh::FromArgs;

#[derive(FromArgs, Debug, Default)]
/// muvee-agent: the build and deploy agent of the muvee PaaS. Registers with the control
/// plane, polls for tasks and runs them with git, docker and rsync. Runs in the foreground.
pub struct Args {
    /// node role: builder or deploy [NODE_ROLE]
    #[argh(option)]
    pub node_role: Option<String>,
    /// control plane base URL, http or https [CONTROL_PLANE_URL, default http://localhost:8080]
    #[argh(option)]
    pub control_plane_url: Option<String>,
    /// PEM bundle of the CAs an https control plane's certificate chains to, instead of the
    /// built-in Mozilla roots [CONTROL_PLANE_CA_FILE]
    #[argh(option)]
    pub control_plane_ca_file: Option<String>,
    /// file holding the shared agent secret (there is no flag for the value itself, so it never
    /// shows in argv) [AGENT_SECRET]
    #[argh(option)]
    pub agent_secret_file: Option<String>,
    /// IP address Traefik uses to reach this node [HOST_IP, default: detected]
    #[argh(option)]
    pub host_ip: Option<String>,
    /// node name sent as hostname [NODE_NAME, default: the hostname]
    #[argh(option)]
    pub node_name: Option<String>,
    /// state, clones and dataset cache [DATA_DIR, default /muvee/data]
    #[argh(option)]
    pub data_dir: Option<String>,
    /// dataset cache budget, bytes or 100G-style [MAX_STORAGE, default 100G]
    #[argh(option)]
    pub max_storage: Option<String>,
    /// builder: git cache budget, 0 turns the cache off [GIT_CACHE_MAX, default 20G]
    #[argh(option)]
    pub git_cache_max: Option<String>,
    /// log a task may keep on disk while the control plane is slow [LOG_SPILL_MAX, default 256M]
    #[argh(option)]
    pub log_spill_max: Option<String>,
    /// time between polls [POLL_INTERVAL, default 5s]
    #[argh(option)]
    pub poll_interval: Option<String>,
    /// tasks run at once [MAX_CONCURRENT_TASKS, default 4]
    #[argh(option)]
    pub max_concurrent_tasks: Option<String>,
    /// builds run at once [BUILDER_MAX_CONCURRENT, default 1]
    #[argh(option)]
    pub builder_max_concurrent: Option<String>,
    /// time running tasks get to finish after SIGTERM [SHUTDOWN_GRACE, default 5m]
    #[argh(option)]
    pub shutdown_grace: Option<String>,
    /// re-register/heartbeat period [HEARTBEAT_INTERVAL, default 30s]
    #[argh(option)]
    pub heartbeat_interval: Option<String>,
    /// limit for a whole build [BUILD_TIMEOUT, default 60m]
    #[argh(option)]
    pub build_timeout: Option<String>,
    /// kill a build step that prints nothing for this long [BUILD_IDLE_TIMEOUT, default 15m]
    #[argh(option)]
    pub build_idle_timeout: Option<String>,
    /// docker CLI binary [DOCKER_CLI, default docker]
    #[argh(option)]
    pub docker_cli: Option<String>,
    /// pass proxy variables to builds as build args [BUILDER_PROXY_PASSTHROUGH, default true]
    #[argh(option)]
    pub builder_proxy_passthrough: Option<String>,
    /// time a new container gets to become healthy [DEPLOY_HEALTH_TIMEOUT, default 60s]
    #[argh(option)]
    pub deploy_health_timeout: Option<String>,
    /// time the old container keeps serving after a deploy [DEPLOY_DRAIN, default 10s]
    #[argh(option)]
    pub deploy_drain: Option<String>,
    /// deploy role: how long a leftover container of ours stays before it is removed
    /// [REAP_GRACE, default 10m]
    #[argh(option)]
    pub reap_grace: Option<String>,
    /// deploy role: what compose projects may ask of the host, baseline (no privileged
    /// containers, host namespaces, devices, extra capabilities or bind mounts outside the
    /// app's dirs) or off [DEPLOY_COMPOSE_POLICY, default baseline]
    #[argh(option)]
    pub deploy_compose_policy: Option<String>,
    /// debug logging (same as RUST_LOG=debug)
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
    #[argh(subcommand)]
    pub cmd: Option<Sub>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Sub {
    Run(RunArgs),
    RunTask(RunTaskArgs),
    Check(CheckArgs),
}

#[derive(FromArgs, Debug)]
/// run the agent in the foreground (the default)
#[argh(subcommand, name = "run")]
pub struct RunArgs {}

#[derive(FromArgs, Debug, Default)]
/// run one task locally, without a control plane: logs to stderr, the completion body to
/// stdout; exit 0 completed, 1 failed, 2 bad input
#[argh(subcommand, name = "run-task")]
pub struct RunTaskArgs {
    /// task JSON as the control plane sends it, or a bare payload with --type ("-" = stdin)
    #[argh(option, default = "String::from(\"-\")")]
    pub file: String,
    /// task type when the input is a bare payload (a type the agent does not run is refused
    /// with the list of those it runs)
    #[argh(option, long = "type")]
    pub kind: Option<String>,
    /// JSON file shaped like GET /api/agent/config (registry and NFS settings)
    #[argh(option)]
    pub agent_config: Option<String>,
    /// registry address [REGISTRY_ADDR]
    #[argh(option)]
    pub registry_addr: Option<String>,
    /// registry user; the password comes from REGISTRY_PASSWORD [REGISTRY_USER]
    #[argh(option)]
    pub registry_user: Option<String>,
    /// dataset share root [DATASET_NFS_BASE_PATH]
    #[argh(option)]
    pub dataset_nfs_base_path: Option<String>,
    /// workspace volume root [VOLUME_NFS_BASE_PATH]
    #[argh(option)]
    pub volume_nfs_base_path: Option<String>,
}

#[derive(FromArgs, Debug)]
/// check this host: git, docker, buildx, rsync, DATA_DIR, control plane, registry login
#[argh(subcommand, name = "check")]
pub struct CheckArgs {}
