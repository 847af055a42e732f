//! The compose policy (DEPLOY_COMPOSE_POLICY=baseline, the default): a compose file is root
//! on the host unless something stops it, so a project's containers are judged the way the
//! engine will run them (created, not started, then inspected: YAML anchors, `extends` and
//! v1/v2 differences are already resolved) against Kubernetes' "baseline" Pod Security
//! Standard. Refused: privileged containers; host network, PID, IPC, UTS or user namespaces,
//! or another app's container's; devices and device cgroup rules; capabilities beyond
//! docker's defaults; unconfined seccomp, AppArmor or system paths, disabled SELinux labels;
//! sysctls outside the baseline's list; host paths outside the app's own dirs, as bind
//! mounts or as local volumes over a host path; volumes and `volumes_from` of other projects.

use crate::sys::docker::{Created, HostConfig, Mount, VolumeInfo};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Capabilities a container may add: Kubernetes' baseline list, plus NET_RAW, which docker
/// grants by default anyway.
const CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Kubernetes' baseline "safe" sysctls.
const SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ping_group_range",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_syncookies",
];

/// Local volume types whose `device` is not a path on this host.
const REMOTE_TYPES: &[&str] = &["nfs", "nfs4", "cifs", "smb3", "tmpfs"];

/// One refused setting: the service, its compose key and what it asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub service: String,
    pub key: &'static str,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service {}: `{}` {}", self.service, self.key, self.what)
    }
}

/// What a project's containers are judged against.
pub struct Rules<'a> {
    pub project: &'a str,
    /// Host dirs the project may mount: its own files and the app's workspace.
    pub roots: Vec<PathBuf>,
    /// The project's named volumes, as `docker volume inspect` shows them.
    pub volumes: &'a [VolumeInfo],
}

/// Every violation of every container of the project, in container order.
pub fn judge(containers: &[Created], rules: &Rules) -> Vec<Violation> {
    let roots: Vec<PathBuf> = rules.roots.iter().map(|r| resolve(r)).collect();
    let mut out = Vec::new();
    for c in containers {
        let mut add = |key, what: String| {
            out.push(Violation {
                service: c.service.clone(),
                key,
                what,
            })
        };
        host_config(&c.host_config, containers, &mut add);
        for m in c.mounts.iter().flatten() {
            if let Some(what) = mount(m, &roots, rules) {
                add("volumes", what);
            }
        }
    }
    out
}

/// The host config's settings, each under its compose key.
fn host_config(h: &HostConfig, own: &[Created], add: &mut dyn FnMut(&'static str, String)) {
    if h.privileged {
        add("privileged", "is true".into());
    }
    for (key, mode) in [
        ("network_mode", &h.network_mode),
        ("pid", &h.pid_mode),
        ("ipc", &h.ipc_mode),
        ("uts", &h.uts_mode),
        ("userns_mode", &h.userns_mode),
    ] {
        if mode == "host"
            || mode
                .strip_prefix("container:")
                .is_some_and(|c| !ours(c, own))
        {
            add(key, format!("is {mode:?}"));
        }
    }
    for v in h.volumes_from.iter().flatten() {
        let name = v.split(':').next().unwrap_or(v);
        if !ours(name, own) {
            add(
                "volumes_from",
                format!("names {name:?}, not a container of this project"),
            );
        }
    }
    for cap in h.cap_add.iter().flatten() {
        let c = cap.to_ascii_uppercase();
        if !CAPS.contains(&c.strip_prefix("CAP_").unwrap_or(&c)) {
            add("cap_add", format!("adds {cap}"));
        }
    }
    for d in h.devices.iter().flatten() {
        add("devices", format!("maps {}", d.path_on_host));
    }
    for r in h.device_cgroup_rules.iter().flatten() {
        add("device_cgroup_rules", format!("allows {r:?}"));
    }
    for o in h.security_opt.iter().flatten() {
        let (k, v) = o.split_once(['=', ':']).unwrap_or((o, ""));
        let weak = match k {
            "seccomp" | "apparmor" | "systempaths" => v == "unconfined",
            "label" => v == "disable",
            _ => false,
        };
        if weak {
            add("security_opt", format!("sets {o}"));
        }
    }
    for k in h.sysctls.iter().flatten().map(|(k, _)| k) {
        if !SYSCTLS.contains(&k.as_str()) {
            add("sysctls", format!("sets {k}"));
        }
    }
}

/// Whether `name` (a full id, as compose writes them, or a name) is one of the project's
/// containers. Not an id prefix: docker would look a short one up as a name first.
fn ours(name: &str, own: &[Created]) -> bool {
    own.iter()
        .any(|c| c.id == name || c.name.trim_start_matches('/') == name)
}

/// Why a mount is refused, if it is.
fn mount(m: &Mount, roots: &[PathBuf], rules: &Rules) -> Option<String> {
    let outside = |p: &str| {
        let r = resolve(Path::new(p));
        // A `..` left in it could not be resolved: it may climb out of any root.
        let climbs = r.components().any(|c| c == Component::ParentDir);
        (climbs || !roots.iter().any(|root| r.starts_with(root)))
            .then(|| format!("mounts host path {p}, outside the project's files and workspace"))
    };
    match m.kind.as_str() {
        "bind" => outside(&m.source),
        "volume" => {
            let name = m.name.as_deref().unwrap_or("");
            let v = rules.volumes.iter().find(|v| v.name == name)?;
            let labels = v.labels.as_ref();
            let project = labels.and_then(|l| l.get("com.docker.compose.project"));
            if project.is_some_and(|p| p != rules.project) {
                return Some(format!("mounts volume {name} of another project"));
            }
            let opts = v.options.as_ref().filter(|_| v.driver == "local")?;
            let device = opts.get("device").filter(|d| !d.is_empty())?;
            let kind = opts.get("type").map_or("", String::as_str);
            if REMOTE_TYPES.contains(&kind) {
                return None;
            }
            outside(device).map(|w| format!("volume {name} {w}"))
        }
        _ => None,
    }
}

/// `p` with every symlink of its longest existing ancestor resolved: where a mount of it
/// lands. What does not exist yet is created by docker as a directory, below that.
fn resolve(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(real, |acc, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            // `..` or the root itself: nothing better than the path as given.
            _ => return p.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::docker::Device;
    use std::collections::BTreeMap;

    fn container(service: &str, h: HostConfig, mounts: Vec<Mount>) -> Created {
        Created {
            id: format!("{service:0>12}deadbeef"),
            name: format!("/muvee-p-{service}-1"),
            status: "created".into(),
            service: service.into(),
            host_config: h,
            mounts: Some(mounts),
        }
    }

    fn bind(source: &Path) -> Mount {
        Mount {
            kind: "bind".into(),
            source: source.display().to_string(),
            name: None,
        }
    }

    fn volume(name: &str) -> Mount {
        Mount {
            kind: "volume".into(),
            source: format!("/var/lib/docker/volumes/{name}/_data"),
            name: Some(name.into()),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn vol(name: &str, project: &str, opts: &[(&str, &str)]) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            driver: "local".into(),
            options: map(opts),
            labels: map(&[("com.docker.compose.project", project)]),
        }
    }

    #[test]
    fn each_way_out_of_the_container_is_named_with_its_service_and_key() {
        let h = HostConfig {
            privileged: true,
            network_mode: "host".into(),
            pid_mode: "host".into(),
            ipc_mode: "container:0123456789ab".into(),
            uts_mode: "host".into(),
            userns_mode: "host".into(),
            cap_add: Some(vec!["CAP_SYS_ADMIN".into(), "chown".into(), "ALL".into()]),
            devices: Some(vec![Device {
                path_on_host: "/dev/sda".into(),
            }]),
            device_cgroup_rules: Some(vec!["c 1:3 mr".into()]),
            security_opt: Some(vec![
                "seccomp=unconfined".into(),
                "apparmor:unconfined".into(),
                "label=disable".into(),
                "systempaths=unconfined".into(),
                "no-new-privileges:true".into(),
            ]),
            sysctls: map(&[("kernel.msgmax", "1"), ("net.ipv4.tcp_syncookies", "1")]),
            volumes_from: Some(vec!["muvee-other:ro".into()]),
        };
        let c = container("side", h, vec![]);
        let v = judge(
            &[c],
            &Rules {
                project: "muvee-p",
                roots: vec![],
                volumes: &[],
            },
        );
        let text: Vec<String> = v.iter().map(|v| v.to_string()).collect();
        assert_eq!(
            text,
            [
                "service side: `privileged` is true",
                "service side: `network_mode` is \"host\"",
                "service side: `pid` is \"host\"",
                "service side: `ipc` is \"container:0123456789ab\"",
                "service side: `uts` is \"host\"",
                "service side: `userns_mode` is \"host\"",
                "service side: `volumes_from` names \"muvee-other\", not a container of this project",
                "service side: `cap_add` adds CAP_SYS_ADMIN",
                "service side: `cap_add` adds ALL",
                "service side: `devices` maps /dev/sda",
                "service side: `device_cgroup_rules` allows \"c 1:3 mr\"",
                "service side: `security_opt` sets seccomp=unconfined",
                "service side: `security_opt` sets apparmor:unconfined",
                "service side: `security_opt` sets label=disable",
                "service side: `security_opt` sets systempaths=unconfined",
                "service side: `sysctls` sets kernel.msgmax",
            ]
        );
    }

    #[test]
    fn the_projects_own_containers_dirs_and_volumes_are_allowed() {
        let dir = std::env::temp_dir().join(format!("muvee-policy-{}", std::process::id()));
        let (src, ws) = (dir.join("src"), dir.join("ws"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&ws).unwrap();
        // A symlink in the repository does not make the host reachable.
        let _ = std::fs::remove_file(src.join("up"));
        std::os::unix::fs::symlink("/", src.join("up")).unwrap();
        let volumes = [
            vol("muvee-p_data", "muvee-p", &[]),
            vol(
                "muvee-p_nfs",
                "muvee-p",
                &[("type", "nfs"), ("device", ":/export")],
            ),
            vol(
                "muvee-p_host",
                "muvee-p",
                &[("o", "bind"), ("device", "/etc")],
            ),
            vol("muvee-q_data", "muvee-q", &[]),
        ];
        let a = container("a", HostConfig::default(), vec![]);
        let b = container(
            "b",
            HostConfig {
                network_mode: format!("container:{}", a.id),
                pid_mode: "container:muvee-p-a-1".into(),
                cap_add: Some(vec!["NET_BIND_SERVICE".into(), "CAP_NET_RAW".into()]),
                sysctls: map(&[("net.ipv4.ip_unprivileged_port_start", "0")]),
                ..HostConfig::default()
            },
            vec![
                bind(&src.join("conf/nginx.conf")),
                bind(&ws),
                volume("muvee-p_data"),
                volume("muvee-p_nfs"),
                volume("muvee-p_host"),
                volume("muvee-q_data"),
                bind(&src.join("up/etc")),
                bind(&src.join("../ws/../..")),
                bind(Path::new("/var/run/docker.sock")),
            ],
        );
        let rules = Rules {
            project: "muvee-p",
            roots: vec![src.clone(), ws.clone()],
            volumes: &volumes,
        };
        let text: Vec<String> = judge(&[a, b], &rules)
            .iter()
            .map(|v| v.to_string())
            .collect();
        let outside = "outside the project's files and workspace";
        assert_eq!(
            text,
            [
                format!(
                    "service b: `volumes` volume muvee-p_host mounts host path /etc, {outside}"
                ),
                "service b: `volumes` mounts volume muvee-q_data of another project".into(),
                format!(
                    "service b: `volumes` mounts host path {}, {outside}",
                    src.join("up/etc").display()
                ),
                format!(
                    "service b: `volumes` mounts host path {}, {outside}",
                    src.join("../ws/../..").display()
                ),
                format!("service b: `volumes` mounts host path /var/run/docker.sock, {outside}"),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
