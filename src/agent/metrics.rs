//! Node metrics for `POST /api/agent/node-metrics` (both server versions accept it), read
//! from /proc and statvfs: CPU since the last sample, memory, DATA_DIR disk, load averages.
//! Deploy role: the apps' container statuses and container metrics (`docker stats`).

use crate::sys::docker::{Docker, PsRow, StatsRow};
use crate::sys::sync::KeyedLocks;
use crate::work::{deployer, reaper};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// Remembers the previous /proc/stat totals so CPU% covers the interval between samples.
#[derive(Default)]
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    pub fn sample(&mut self) -> f64 {
        let Some((busy, total)) = read_cpu() else {
            return 0.0;
        };
        let pct = match self.last {
            Some((b0, t0)) if total > t0 => {
                (busy.saturating_sub(b0)) as f64 * 100.0 / (total - t0) as f64
            }
            _ => 0.0,
        };
        self.last = Some((busy, total));
        (pct * 100.0).round() / 100.0
    }
}

fn read_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let nums: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    let total: u64 = nums.iter().take(8).sum();
    let idle = nums.get(3)? + nums.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal:");
    (total, total.saturating_sub(field("MemAvailable:")))
}

/// (total, used) bytes of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> Option<(u64, u64)> {
    crate::sys::disk::usage(path).map(|u| (u.total_bytes, u.used_bytes))
}

pub fn node_metrics(node_id: &str, data_dir: &Path, cpu: &mut CpuSampler) -> Value {
    let (mem_total, mem_used) = meminfo();
    let (disk_total, disk_used) = disk_usage(data_dir)
        .or_else(|| disk_usage(Path::new("/")))
        .unwrap_or((0, 0));
    let load: Vec<f64> = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|n| n.parse().ok())
        .collect();
    let l = |i: usize| load.get(i).copied().unwrap_or(0.0);
    json!({
        "node_id": node_id,
        "cpu_percent": cpu.sample(),
        "mem_total_bytes": mem_total,
        "mem_used_bytes": mem_used,
        "disk_total_bytes": disk_total,
        "disk_used_bytes": disk_used,
        "load1": l(0),
        "load5": l(1),
        "load15": l(2),
    })
}

/// The apps' current containers this node owns: running, named exactly `muvee-<prefix>`,
/// labelled with our NODE_NAME (`reaper::ours`; another installation's apps on the same
/// engine are not ours to report), or the exposed service of a compose project
/// `muvee-<prefix>` (our override labels it, without a node). Containers set aside during a
/// replacement are not apps. Each with its domain prefix.
pub fn current_apps(docker: &Docker, node: &str) -> Option<Vec<(String, PsRow)>> {
    let list = docker.ps(false, "muvee-").ok()?;
    let mut out = Vec::new();
    for c in list {
        let prefix = c.domain_prefix.clone();
        let main = format!("muvee-{prefix}");
        let compose = c.node.is_empty() && c.compose_project == main;
        if reaper::ours(&c, node) && c.name == main || !prefix.is_empty() && compose {
            out.push((prefix, c));
        }
    }
    Some(out)
}

/// An element of `POST /api/agent/container-statuses`, keys in the Go agent's order;
/// `host_port` (today's server) is left out when unknown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerStatus {
    pub domain_prefix: String,
    pub restart_count: u64,
    pub oom_killed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

/// The deploy role's report every HEARTBEAT_INTERVAL: restart count, OOM flag and the current
/// host port, which re-routes Traefik after a Docker restart gave an app a new ephemeral port.
/// Each app is looked at under its deploy lock, and one whose lock is held is left out (the
/// next report has it): a replacement gives the app's name to its new container before that
/// one is healthy, and today's server would route to it at once.
pub fn container_statuses(
    docker: &Docker,
    apps: &[(String, PsRow)],
    locks: &KeyedLocks,
) -> Vec<ContainerStatus> {
    let status = |prefix: &String, c: &PsRow| {
        let (restart_count, oom_killed) = docker
            .state(&c.name)
            .map(|st| (st.restarts, st.oom_killed))
            .unwrap_or((0, false));
        let spec = (!c.expose_port.is_empty()).then_some(c.expose_port.as_str());
        let ports = docker.ports(&c.name, spec).unwrap_or_default();
        let host_port = ports.iter().find(|p| p.1).or(ports.first()).map(|p| p.0);
        ContainerStatus {
            domain_prefix: prefix.clone(),
            restart_count,
            oom_killed,
            host_port,
        }
    };
    let settled = |(prefix, c): &(String, PsRow)| {
        locks.try_with(&deployer::lock_key(prefix), || status(prefix, c))
    };
    apps.iter().filter_map(settled).collect()
}

/// An element of `POST /api/agent/container-metrics` (§1.7), keys in the Go agent's order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerMetrics {
    pub domain_prefix: String,
    pub cpu_percent: f64,
    pub mem_usage_bytes: u64,
    pub mem_limit_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
}

/// The metrics body from one `docker stats` sample of the apps; apps docker did not sample
/// (stopped in between) are left out.
pub fn container_metrics(apps: &[(String, PsRow)], rows: &[StatsRow]) -> Vec<ContainerMetrics> {
    let mut out = Vec::new();
    for (prefix, c) in apps {
        let Some(r) = rows.iter().find(|r| r.name == c.name) else {
            continue;
        };
        let (mem_usage_bytes, mem_limit_bytes) = parse_pair(&r.mem);
        let (net_rx_bytes, net_tx_bytes) = parse_pair(&r.net);
        let (block_read_bytes, block_write_bytes) = parse_pair(&r.block);
        out.push(ContainerMetrics {
            domain_prefix: prefix.clone(),
            cpu_percent: parse_percent(&r.cpu),
            mem_usage_bytes,
            mem_limit_bytes,
            net_rx_bytes,
            net_tx_bytes,
            block_read_bytes,
            block_write_bytes,
        });
    }
    out
}

/// `1.37%` → 1.37; docker's `--` (no sample) or anything unreadable → 0.
pub fn parse_percent(s: &str) -> f64 {
    let v: f64 = s.trim().trim_end_matches('%').parse().unwrap_or(0.0);
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        0.0
    }
}

/// `464KiB / 64MiB` → (475136, 67108864); an unreadable side is 0.
pub fn parse_pair(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('/').unwrap_or((s, ""));
    (parse_bytes(a).unwrap_or(0), parse_bytes(b).unwrap_or(0))
}

/// A size as docker prints it: decimal units for I/O (`736B`, `1.2kB`, `12.3MB`, `4.1GB`,
/// `1TB`), binary ones for memory (`464KiB`, `50MiB`, `1.952GiB`, `2TiB`), and PB/PiB.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let n: f64 = s[..at].parse().ok()?;
    let mult: f64 = match s[at..].trim() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "PB" => 1e15,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        "PiB" => 1024f64.powi(5),
        _ => return None,
    };
    let v = (n * mult).round();
    (v.is_finite() && v < u64::MAX as f64).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_cover_apps_and_exposed_compose_services_but_not_asides() {
        use crate::sys::fake::{Fake, Reply};
        let fake = Fake::new();
        let rows = [
            "a1\tmuvee-app\trunning\tapp\td1\t8080\tn\t",
            "b2\tmuvee-app-old-a1\trunning\tapp\td0\t8080\tn\t",
            "c3\tmuvee-shop_web_1\trunning\tshop\td2\t80\t\tmuvee-shop",
            "d4\tmuvee-shop_db_1\trunning\t\t\t\t\tmuvee-shop",
            // Another node's app, and a container nobody labelled.
            "e5\tmuvee-foo\trunning\tfoo\td3\t8080\tother\t",
            "f6\tmuvee-bar\trunning\t\t\t\t\t",
        ];
        fake.on("docker ps --filter name=muvee-", Reply::Ok(rows.join("\n")));
        fake.on("docker inspect", Reply::Ok("running 2 0 false".into()));
        fake.on("docker port", Reply::Ok("0.0.0.0:32768".into()));
        let docker = Docker::new("docker", &*fake);
        let apps = current_apps(&docker, "n").unwrap();
        let locks = KeyedLocks::new(Default::default());
        let s = container_statuses(&docker, &apps, &locks);
        let prefixes: Vec<&str> = s.iter().map(|v| v.domain_prefix.as_str()).collect();
        assert_eq!(prefixes, ["app", "shop"], "{s:?}");
        assert_eq!(s[1].host_port, Some(32768));
        assert!(!fake.ran("docker port muvee-shop_web_1 80").is_empty());
        // While a deploy (or restart, pause) of `app` holds its lock, `app` is left out.
        let during = locks.try_with(&deployer::lock_key("app"), || {
            container_statuses(&docker, &apps, &locks)
        });
        let s = during.unwrap();
        let prefixes: Vec<&str> = s.iter().map(|v| v.domain_prefix.as_str()).collect();
        assert_eq!(prefixes, ["shop"], "{s:?}");
    }

    #[test]
    fn metrics_have_the_go_agent_keys_and_real_values() {
        let mut cpu = CpuSampler::default();
        let m = node_metrics("n1", Path::new("/"), &mut cpu);
        for k in [
            "cpu_percent",
            "mem_total_bytes",
            "mem_used_bytes",
            "disk_total_bytes",
            "disk_used_bytes",
            "load1",
            "load5",
            "load15",
        ] {
            assert!(m.get(k).is_some(), "{k} missing in {m}");
        }
        assert!(m["mem_total_bytes"].as_u64().unwrap() > 0);
        assert!(m["disk_total_bytes"].as_u64().unwrap() > 0);
    }

    #[test]
    fn every_unit_docker_prints_is_read() {
        let cases = [
            ("0B", 0),
            ("736B", 736),
            ("1.2kB", 1200),
            ("12.3MB", 12_300_000),
            ("4.1GB", 4_100_000_000),
            ("1TB", 1_000_000_000_000),
            ("2PB", 2_000_000_000_000_000),
            ("464KiB", 475_136),
            ("50MiB", 52_428_800),
            ("1.952GiB", 2_095_944_040),
            ("2TiB", 2_199_023_255_552),
            ("1PiB", 1_125_899_906_842_624),
            (" 1.395MiB ", 1_462_764),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text), Some(bytes), "{text}");
        }
        for bad in ["", "--", "12", "1.2XB", "MiB", "-1B"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
        assert_eq!(parse_pair("464KiB / 64MiB"), (475_136, 67_108_864));
        assert_eq!(parse_pair("-- / --"), (0, 0));
        assert_eq!(parse_percent("89.76%"), 89.76);
        assert_eq!(parse_percent("--"), 0.0);
    }

    /// Lines as `docker stats --no-stream --format '{{json .}}'` printed them (CLI 28.2.2,
    /// engine 20.10.24; the third from an engine with block I/O accounting).
    #[test]
    fn metrics_bodies_from_real_docker_stats_lines() {
        let lines = [
            r#"{"BlockIO":"0B / 0B","CPUPerc":"0.00%","Container":"muvee-probe-ops1","ID":"2be2bad5dba7","MemPerc":"0.71%","MemUsage":"464KiB / 64MiB","Name":"muvee-probe-ops1","NetIO":"736B / 0B","PIDs":"1"}"#,
            r#"{"BlockIO":"0B / 0B","CPUPerc":"89.76%","Container":"ops-st1","ID":"a3334efcd03f","MemPerc":"0.01%","MemUsage":"1.395MiB / 23.54GiB","Name":"muvee-busy","NetIO":"736B / 0B","PIDs":"1"}"#,
            r#"{"BlockIO":"12.3MB / 4.1kB","CPUPerc":"1.37%","Container":"c","ID":"c","MemPerc":"1.22%","MemUsage":"50MiB / 4GiB","Name":"muvee-myapp","NetIO":"1.2MB / 345kB","PIDs":"12"}"#,
        ];
        let rows: Vec<StatsRow> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let app = |prefix: &str| {
            let row = PsRow {
                name: format!("muvee-{prefix}"),
                ..PsRow::default()
            };
            (prefix.to_string(), row)
        };
        let apps = [app("probe-ops1"), app("myapp"), app("gone")];
        let body = serde_json::to_string(&container_metrics(&apps, &rows)).unwrap();
        assert_eq!(
            body,
            r#"[{"domain_prefix":"probe-ops1","cpu_percent":0.0,"mem_usage_bytes":475136,"mem_limit_bytes":67108864,"net_rx_bytes":736,"net_tx_bytes":0,"block_read_bytes":0,"block_write_bytes":0},{"domain_prefix":"myapp","cpu_percent":1.37,"mem_usage_bytes":52428800,"mem_limit_bytes":4294967296,"net_rx_bytes":1200000,"net_tx_bytes":345000,"block_read_bytes":12300000,"block_write_bytes":4100}]"#
        );
    }

    #[test]
    fn statuses_have_the_go_key_order_and_omit_an_unknown_port() {
        let s = |port| ContainerStatus {
            domain_prefix: "myapp".into(),
            restart_count: 2,
            oom_killed: false,
            host_port: port,
        };
        assert_eq!(
            serde_json::to_string(&[s(Some(32768)), s(None)]).unwrap(),
            r#"[{"domain_prefix":"myapp","restart_count":2,"oom_killed":false,"host_port":32768},{"domain_prefix":"myapp","restart_count":2,"oom_killed":false}]"#
        );
    }
}
