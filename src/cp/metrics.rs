//! Node metrics for `POST /api/agent/node-metrics` (both server versions accept it), read
//! from /proc and statvfs: CPU since the last sample, memory, DATA_DIR disk, load averages.

use crate::sys::docker::Docker;
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
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    Some((total, total.saturating_sub(st.f_bfree as u64 * frsize)))
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

/// `POST /api/agent/container-statuses` for the deploy role, as the Go agent sends it every
/// 30 s: restart count, OOM flag and (today's server) the current host port, which re-routes
/// Traefik after a Docker restart gave an app a new ephemeral port. Containers set aside
/// during a replacement are skipped; containers of the Go agent (no labels) count by name.
pub fn container_statuses(docker: &Docker) -> Vec<Value> {
    let Ok(list) = docker.ps(false, "muvee-") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for c in list {
        let prefix = match c.domain_prefix.as_str() {
            // Unlabelled services of a compose project are not apps of their own.
            "" if !c.compose_project.is_empty() => continue,
            "" => c.name.strip_prefix("muvee-").unwrap_or(""),
            label => label,
        };
        // The app's container, or the exposed service of its compose project (the only
        // one there we label); never a container set aside by a replacement.
        let main = format!("muvee-{prefix}");
        if prefix.is_empty() || (c.name != main && c.compose_project != main) {
            continue;
        }
        let (restart_count, oom_killed) = docker
            .state(&c.name)
            .map(|st| (st.restarts, st.oom_killed))
            .unwrap_or((0, false));
        let mut status = json!({"domain_prefix": prefix, "restart_count": restart_count, "oom_killed": oom_killed});
        let spec = (!c.expose_port.is_empty()).then_some(c.expose_port.as_str());
        let ports = docker.ports(&c.name, spec).unwrap_or_default();
        if let Some((host_port, _)) = ports.iter().find(|p| p.1).or(ports.first()) {
            status["host_port"] = json!(host_port);
        }
        out.push(status);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_cover_apps_and_exposed_compose_services_but_not_asides() {
        use crate::sys::fake::{Fake, Reply};
        let fake = Fake::new();
        let rows = [
            "a1\tmuvee-app\trunning\tapp\td1\t8080\t",
            "b2\tmuvee-app-old-a1\trunning\tapp\td0\t8080\t",
            "c3\tmuvee-shop_web_1\trunning\tshop\td2\t80\tmuvee-shop",
            "d4\tmuvee-shop_db_1\trunning\t\t\t\tmuvee-shop",
        ];
        fake.on("docker ps --filter name=muvee-", Reply::Ok(rows.join("\n")));
        fake.on("docker inspect", Reply::Ok("running 2 0 false".into()));
        fake.on("docker port", Reply::Ok("0.0.0.0:32768".into()));
        let docker = Docker::new("docker", &*fake);
        let s = container_statuses(&docker);
        let prefixes: Vec<&str> = s
            .iter()
            .filter_map(|v| v["domain_prefix"].as_str())
            .collect();
        assert_eq!(prefixes, ["app", "shop"], "{s:?}");
        assert_eq!(s[1]["host_port"], 32768);
        assert!(!fake.ran("docker port muvee-shop_web_1 80").is_empty());
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
}
