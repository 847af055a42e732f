//! Agent configuration: the Go agent's environment variables, each overridable by a flag.
//! Bad values are errors that name the variable and the value (exit status 2).

use crate::cli::Args;
use crate::sys::disk;
pub use crate::task::Role;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub role: Option<Role>,
    pub control_plane_url: String,
    pub agent_secret: String,
    /// CONTROL_PLANE_CA_FILE: the roots for https (HTTP client and control channel alike).
    pub ca_file: Option<PathBuf>,
    pub host_ip: Option<String>,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub max_storage: u64,
    /// Budget of the builder's git cache; 0 turns it off (builds clone shallowly).
    pub git_cache_max: u64,
    pub log_spill_max: u64,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub max_concurrent_tasks: usize,
    pub builder_max_concurrent: usize,
    pub shutdown_grace: Duration,
    pub build_timeout: Duration,
    pub build_idle_timeout: Duration,
    pub docker_cli: String,
    pub builder_proxy_passthrough: bool,
    pub deploy_health_timeout: Duration,
    pub deploy_drain: Duration,
    pub reap_grace: Duration,
    pub compose_policy: ComposePolicy,
}

/// What a compose project may ask of the host (DEPLOY_COMPOSE_POLICY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComposePolicy {
    /// Kubernetes' "baseline" Pod Security Standard: no privileged containers, host
    /// namespaces, devices, extra capabilities or bind mounts outside the app's dirs.
    Baseline,
    /// Anything the engine runs: for installations whose every project owner is trusted.
    Off,
}

/// What DATA_DIR allows now.
#[derive(Debug, PartialEq, Eq)]
pub enum DataDir {
    Writable,
    /// No space or no inodes left: why, with what is free.
    Full(String),
}

/// A configuration error; the message names the variable and the value.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Flag first, then the environment; an empty value counts as unset.
fn pick(flag: &Option<String>, env: Env, name: &str) -> Option<String> {
    flag.clone()
        .or_else(|| env(name))
        .filter(|v| !v.trim().is_empty())
}

/// Reads settings for [`Config::load`]: `parsed` turns a picked value into `T` or an error
/// `NAME: invalid value "v" (expected ...)`; unset or empty gives the default.
struct Settings<'a> {
    env: Env<'a>,
}

impl Settings<'_> {
    fn parsed<T>(
        &self,
        flag: &Option<String>,
        name: &str,
        default: T,
        parse: fn(&str) -> Option<T>,
        expect: &str,
    ) -> Result<T, ConfigError> {
        match pick(flag, self.env, name) {
            None => Ok(default),
            Some(v) => parse(v.trim()).ok_or_else(|| invalid(name, &v, expect)),
        }
    }

    /// A duration of at least `min`; `default` and `min` written as a user would (the
    /// default also completes "expected a duration like ...").
    fn duration(
        &self,
        flag: &Option<String>,
        name: &str,
        default: &str,
        min: &str,
    ) -> Result<Duration, ConfigError> {
        let expect = format!("a duration like {default}");
        let default_value = parse_duration(default).unwrap_or_default();
        let d = self.parsed(flag, name, default_value, parse_duration, &expect)?;
        if d < parse_duration(min).unwrap_or_default() {
            let v = pick(flag, self.env, name).unwrap_or_default();
            return Err(invalid(name, &v, &format!("at least {min}")));
        }
        Ok(d)
    }

    /// A whole number >= 1.
    fn count(
        &self,
        flag: &Option<String>,
        name: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        self.parsed(flag, name, default, parse_count, "a whole number >= 1")
    }

    /// A plain string setting, untrimmed, with a default.
    fn text(&self, flag: &Option<String>, name: &str, default: &str) -> String {
        pick(flag, self.env, name).unwrap_or_else(|| default.into())
    }
}

fn invalid(name: &str, value: &str, expect: &str) -> ConfigError {
    ConfigError(format!(
        "{name}: invalid value {value:?} (expected {expect})"
    ))
}

impl Config {
    pub fn load(a: &Args, env: Env) -> Result<Config, ConfigError> {
        let s = Settings { env };
        // Durations, one line each: flag, variable, default, the least value that makes
        // sense (README lists them).
        let d = |flag, name, default, min| s.duration(flag, name, default, min);
        let role = s.parsed(
            &a.node_role,
            "NODE_ROLE",
            None,
            parse_role,
            "builder or deploy",
        )?;
        Ok(Config {
            role,
            control_plane_url: control_plane_url(&s.text(
                &a.control_plane_url,
                "CONTROL_PLANE_URL",
                "http://localhost:8080",
            ))?,
            agent_secret: agent_secret(a, env)?,
            ca_file: pick(&a.control_plane_ca_file, env, "CONTROL_PLANE_CA_FILE")
                .map(PathBuf::from),
            host_ip: pick(&a.host_ip, env, "HOST_IP").map(|s| s.trim().to_string()),
            node_name: pick(&a.node_name, env, "NODE_NAME").unwrap_or_else(hostname),
            data_dir: PathBuf::from(s.text(&a.data_dir, "DATA_DIR", "/muvee/data")),
            max_storage: s.parsed(&a.max_storage, "MAX_STORAGE", 100 << 30, parse_size, SIZE)?,
            git_cache_max: s.parsed(
                &a.git_cache_max,
                "GIT_CACHE_MAX",
                20 << 30,
                parse_size,
                SIZE,
            )?,
            log_spill_max: s.parsed(
                &a.log_spill_max,
                "LOG_SPILL_MAX",
                256 << 20,
                parse_size,
                SIZE,
            )?,
            poll_interval: d(&a.poll_interval, "POLL_INTERVAL", "5s", "100ms")?,
            heartbeat_interval: d(&a.heartbeat_interval, "HEARTBEAT_INTERVAL", "30s", "1s")?,
            max_concurrent_tasks: s.count(&a.max_concurrent_tasks, "MAX_CONCURRENT_TASKS", 4)?,
            builder_max_concurrent: s.count(
                &a.builder_max_concurrent,
                "BUILDER_MAX_CONCURRENT",
                1,
            )?,
            shutdown_grace: d(&a.shutdown_grace, "SHUTDOWN_GRACE", "5m", "0s")?,
            build_timeout: d(&a.build_timeout, "BUILD_TIMEOUT", "60m", "10s")?,
            build_idle_timeout: d(&a.build_idle_timeout, "BUILD_IDLE_TIMEOUT", "15m", "5s")?,
            docker_cli: s.text(&a.docker_cli, "DOCKER_CLI", "docker"),
            builder_proxy_passthrough: s.parsed(
                &a.builder_proxy_passthrough,
                "BUILDER_PROXY_PASSTHROUGH",
                true,
                parse_bool,
                "true or false",
            )?,
            deploy_health_timeout: d(
                &a.deploy_health_timeout,
                "DEPLOY_HEALTH_TIMEOUT",
                "60s",
                "1s",
            )?,
            deploy_drain: d(&a.deploy_drain, "DEPLOY_DRAIN", "10s", "0s")?,
            reap_grace: d(&a.reap_grace, "REAP_GRACE", "10m", "1s")?,
            compose_policy: s.parsed(
                &a.deploy_compose_policy,
                "DEPLOY_COMPOSE_POLICY",
                ComposePolicy::Baseline,
                parse_compose_policy,
                "baseline or off",
            )?,
        })
    }

    /// Creates DATA_DIR and checks that it is writable. A full disk (no space or no inodes
    /// left) is not a bad configuration but a passing fault: `Full` says so, and why.
    pub fn check_data_dir(&self) -> Result<DataDir, ConfigError> {
        let d = &self.data_dir;
        let err = |e: std::io::Error| {
            ConfigError(format!("DATA_DIR: {} is not writable: {e}", d.display()))
        };
        std::fs::create_dir_all(d).map_err(err)?;
        // One byte, so a disk without free blocks fails too, not only one without inodes.
        let probe = d.join(format!(".write-test-{}", std::process::id()));
        let written = std::fs::write(&probe, b"x");
        let _ = std::fs::remove_file(probe);
        let usage = disk::usage(d);
        let full = |why: String| Ok(DataDir::Full(format!("{} is full: {why}", d.display())));
        match (written, usage) {
            (Err(e), _) if !disk::no_space(&e) => Err(err(e)),
            (Err(e), Some(u)) => full(format!("{e} ({u})")),
            (Err(e), None) => full(e.to_string()),
            (Ok(()), Some(u)) if u.full() => full(u.to_string()),
            (Ok(()), _) => Ok(DataDir::Writable),
        }
    }

    /// As [`Config::check_data_dir`], a full disk an error too (one task needs space now).
    pub fn prepare_data_dir(&self) -> Result<(), ConfigError> {
        match self.check_data_dir()? {
            DataDir::Writable => Ok(()),
            DataDir::Full(why) => Err(ConfigError(format!("DATA_DIR: {why}"))),
        }
    }

    /// HOST_IP, else the local address of a UDP socket "connected" to the control plane host
    /// (no packet is sent). IPv6 hosts work, bracketed or not.
    pub fn resolve_host_ip(&self) -> Option<String> {
        if let Some(ip) = &self.host_ip {
            return Some(ip.clone());
        }
        let (_, host, port) = parse_url(&self.control_plane_url)?;
        let target: SocketAddr = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(bind).ok()?;
        sock.connect(target).ok()?;
        let ip = sock.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then(|| ip.to_string())
    }
}

/// CONTROL_PLANE_URL without surrounding blanks or trailing slashes; must parse.
fn control_plane_url(raw: &str) -> Result<String, ConfigError> {
    let url = raw.trim().trim_end_matches('/').to_string();
    match parse_url(&url) {
        Some(_) => Ok(url),
        None => Err(invalid(
            "CONTROL_PLANE_URL",
            &url,
            "http://host[:port] or https://host[:port]",
        )),
    }
}

/// `--agent-secret-file` (read, trimmed), else AGENT_SECRET, else empty.
fn agent_secret(a: &Args, env: Env) -> Result<String, ConfigError> {
    match &a.agent_secret_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| ConfigError(format!("--agent-secret-file: cannot read {path:?}: {e}"))),
        None => Ok(env("AGENT_SECRET").unwrap_or_default().trim().to_string()),
    }
}

/// What MAX_STORAGE expects, for its error message.
const SIZE: &str = "bytes or a size like 100G";

fn parse_role(s: &str) -> Option<Option<Role>> {
    [Role::Builder, Role::Deploy]
        .into_iter()
        .find(|r| r.as_str() == s)
        .map(Some)
}

fn parse_compose_policy(s: &str) -> Option<ComposePolicy> {
    match s {
        "baseline" => Some(ComposePolicy::Baseline),
        "off" => Some(ComposePolicy::Off),
        _ => None,
    }
}

fn parse_count(s: &str) -> Option<usize> {
    s.parse::<usize>().ok().filter(|n| *n >= 1)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `http[s]://host[:port][/path]` → (scheme, host without brackets, port).
pub fn parse_url(url: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    (!host.is_empty()).then(|| (scheme.to_string(), host.to_string(), port))
}

/// The longest duration a setting accepts (100 years): anything beyond is a typo, and a
/// deadline `Instant::now() + d` must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// "90", "90s", "500ms", "5m", "1h", "1h30m"; at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Option<Duration> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(secs(n)).filter(|d| *d <= MAX_DURATION);
    }
    let max = MAX_DURATION.as_secs_f64();
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult = match &rest[..unit] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit..];
        let part = n * mult;
        // Checked before converting: from_secs_f64 panics on huge or non-finite values.
        if !(part.is_finite() && part <= max) {
            return None;
        }
        total = total
            .checked_add(Duration::from_secs_f64(part))
            .filter(|t| *t <= MAX_DURATION)?;
    }
    Some(total)
}

/// "1073741824", "100G", "100GiB", "1.5T", "512M", "10gb" (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let n: f64 = s[..split].parse().ok()?;
    let unit = s[split..].trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    let v = n * (1u64 << shift) as f64;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

/// The Go agent's spelling: false/0/no/off and true/1/yes/on.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&Args::default(), &move |k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_normalisation() {
        let c = load(&[
            ("NODE_ROLE", "deploy"),
            ("CONTROL_PLANE_URL", "http://10.0.0.1:8080/"),
        ])
        .unwrap();
        assert_eq!(c.role, Some(Role::Deploy));
        assert_eq!(c.control_plane_url, "http://10.0.0.1:8080");
        assert_eq!(c.max_storage, 107374182400);
        assert_eq!(c.poll_interval, secs(5));
        assert_eq!(c.builder_max_concurrent, 1);
        assert_eq!(c.data_dir, PathBuf::from("/muvee/data"));
    }

    #[test]
    fn flag_wins_over_env() {
        let a = Args {
            node_role: Some("builder".into()),
            max_storage: Some("1G".into()),
            ..Args::default()
        };
        let c = Config::load(&a, &|k| (k == "NODE_ROLE").then(|| "deploy".into())).unwrap();
        assert_eq!(c.role, Some(Role::Builder));
        assert_eq!(c.max_storage, 1 << 30);
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        assert_eq!(
            load(&[("NODE_ROLE", "web")]).unwrap_err().0,
            "NODE_ROLE: invalid value \"web\" (expected builder or deploy)"
        );
        let e = load(&[("CONTROL_PLANE_URL", "ftp://x")]).unwrap_err().0;
        assert!(
            e.starts_with("CONTROL_PLANE_URL: invalid value \"ftp://x\""),
            "{e}"
        );
        let e = load(&[("MAX_STORAGE", "lots")]).unwrap_err().0;
        assert!(e.contains("MAX_STORAGE") && e.contains("lots"), "{e}");
        let e = load(&[("BUILDER_MAX_CONCURRENT", "0")]).unwrap_err().0;
        assert!(e.contains("BUILDER_MAX_CONCURRENT"), "{e}");
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1h30m"), Some(secs(5400)));
        assert_eq!(parse_duration("7"), Some(secs(7)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_size("100G"), Some(100 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("5X"), None);
        assert_eq!(
            parse_url("http://[fd00::1]:8080/x"),
            Some(("http".into(), "fd00::1".into(), 8080))
        );
        assert_eq!(
            parse_url("https://cp.example"),
            Some(("https".into(), "cp.example".into(), 443))
        );
        assert_eq!(parse_url("http://u:p@cp"), None);
    }

    #[test]
    fn huge_or_non_finite_durations_are_invalid_not_a_panic() {
        for v in [
            "99999999999999999999s",
            "18446744073709551615",
            "18446744073709551615ms",
            "3155760001",
            "876601h",
            "876000h876000h",
            "1e400s",
            "inf",
            "NaN",
        ] {
            assert_eq!(parse_duration(v), None, "{v}");
        }
        assert_eq!(parse_duration("876000h"), Some(MAX_DURATION));
        assert_eq!(parse_duration("3153600000"), Some(MAX_DURATION));
        // The largest accepted value still makes a deadline.
        let _ = std::time::Instant::now() + MAX_DURATION;
        assert_eq!(
            load(&[("POLL_INTERVAL", "99999999999999999999s")])
                .unwrap_err()
                .0,
            "POLL_INTERVAL: invalid value \"99999999999999999999s\" (expected a duration like 5s)"
        );
        assert_eq!(
            load(&[("HEARTBEAT_INTERVAL", "18446744073709551615")])
                .unwrap_err()
                .0,
            "HEARTBEAT_INTERVAL: invalid value \"18446744073709551615\" (expected a duration like 30s)"
        );
    }

    #[test]
    fn every_setting_keeps_its_default_and_error_text() {
        let c = load(&[]).unwrap();
        assert_eq!(c.role, None);
        assert_eq!(c.control_plane_url, "http://localhost:8080");
        assert_eq!(c.agent_secret, "");
        assert_eq!(c.host_ip, None);
        assert_eq!(c.heartbeat_interval, secs(30));
        assert_eq!(c.max_concurrent_tasks, 4);
        assert_eq!(c.shutdown_grace, secs(300));
        assert_eq!(c.build_timeout, secs(3600));
        assert_eq!(c.build_idle_timeout, secs(900));
        assert_eq!(c.docker_cli, "docker");
        assert!(c.builder_proxy_passthrough);
        assert_eq!(c.deploy_health_timeout, secs(60));
        assert_eq!(c.deploy_drain, secs(10));
        assert_eq!(c.reap_grace, secs(600));
        let cases = [
            ("NODE_ROLE", " web ", "builder or deploy"),
            ("MAX_STORAGE", "lots", "bytes or a size like 100G"),
            ("POLL_INTERVAL", "soon", "a duration like 5s"),
            ("HEARTBEAT_INTERVAL", "soon", "a duration like 30s"),
            ("MAX_CONCURRENT_TASKS", "0", "a whole number >= 1"),
            ("BUILDER_MAX_CONCURRENT", "-1", "a whole number >= 1"),
            ("SHUTDOWN_GRACE", "soon", "a duration like 5m"),
            ("BUILD_TIMEOUT", "soon", "a duration like 60m"),
            ("BUILD_IDLE_TIMEOUT", "soon", "a duration like 15m"),
            ("BUILDER_PROXY_PASSTHROUGH", "maybe", "true or false"),
            ("DEPLOY_HEALTH_TIMEOUT", "soon", "a duration like 60s"),
            ("DEPLOY_DRAIN", "soon", "a duration like 10s"),
            ("REAP_GRACE", "soon", "a duration like 10m"),
        ];
        for (name, value, expect) in cases {
            assert_eq!(
                load(&[(name, value)]).unwrap_err().0,
                format!("{name}: invalid value {value:?} (expected {expect})")
            );
        }
        // Empty or blank counts as unset; values are trimmed before parsing.
        let c = load(&[
            ("POLL_INTERVAL", "  "),
            ("NODE_ROLE", ""),
            ("DEPLOY_DRAIN", " 2m "),
            ("MAX_CONCURRENT_TASKS", " 8"),
            ("CONTROL_PLANE_URL", " https://cp.example// "),
            ("HOST_IP", " 10.0.0.9 "),
            ("BUILDER_PROXY_PASSTHROUGH", "off"),
        ])
        .unwrap();
        assert_eq!(c.poll_interval, secs(5));
        assert_eq!(c.role, None);
        assert_eq!(c.deploy_drain, secs(120));
        assert_eq!(c.max_concurrent_tasks, 8);
        assert_eq!(c.control_plane_url, "https://cp.example");
        assert_eq!(c.host_ip.as_deref(), Some("10.0.0.9"));
        assert!(!c.builder_proxy_passthrough);
    }

    #[test]
    fn durations_below_their_minimum_are_refused_naming_the_variable() {
        let cases = [
            ("POLL_INTERVAL", "0", "100ms", "100ms"),
            ("POLL_INTERVAL", "99ms", "100ms", "100ms"),
            ("HEARTBEAT_INTERVAL", "0", "1s", "1s"),
            ("BUILD_TIMEOUT", "9s", "10s", "10s"),
            ("BUILD_IDLE_TIMEOUT", "0", "5s", "5s"),
            ("DEPLOY_HEALTH_TIMEOUT", "0", "1s", "1s"),
            ("REAP_GRACE", "0", "1s", "1s"),
        ];
        for (name, low, min, ok) in cases {
            assert_eq!(
                load(&[(name, low)]).unwrap_err().0,
                format!("{name}: invalid value {low:?} (expected at least {min})")
            );
            assert!(load(&[(name, ok)]).is_ok(), "{name}={ok}");
        }
        // Zero means "at once" for these two.
        let c = load(&[("SHUTDOWN_GRACE", "0"), ("DEPLOY_DRAIN", "0s")]).unwrap();
        assert_eq!((c.shutdown_grace, c.deploy_drain), (secs(0), secs(0)));
    }

    #[test]
    fn the_compose_policy_is_baseline_unless_turned_off() {
        assert_eq!(load(&[]).unwrap().compose_policy, ComposePolicy::Baseline);
        let c = load(&[("DEPLOY_COMPOSE_POLICY", " off ")]).unwrap();
        assert_eq!(c.compose_policy, ComposePolicy::Off);
        assert_eq!(
            load(&[("DEPLOY_COMPOSE_POLICY", "privileged")])
                .unwrap_err()
                .0,
            "DEPLOY_COMPOSE_POLICY: invalid value \"privileged\" (expected baseline or off)"
        );
    }

    #[test]
    fn detects_host_ip_for_ipv4_and_ipv6_loopback() {
        let mut c = load(&[("CONTROL_PLANE_URL", "http://127.0.0.1:9")]).unwrap();
        assert_eq!(c.resolve_host_ip().as_deref(), Some("127.0.0.1"));
        c.control_plane_url = "http://[::1]:9".into();
        // IPv6 may be disabled on a host; when it works the answer is ::1.
        if let Some(ip) = c.resolve_host_ip() {
            assert_eq!(ip, "::1");
        }
    }
}
