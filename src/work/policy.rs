//! The compose policy (DEPLOY_COMPOSE_POLICY=baseline, the default): a compose file is root
//! on the host unless something stops it, so a project's containers are judged the way the
//! engine will run them (created, not started, then inspected: YAML anchors, `extends` and
//! v1/v2 differences are already resolved) against Kubernetes' "baseline" Pod Security
//! Standard. Refused: privileged containers; host network, PID, IPC, UTS or user namespaces,
//! or another app's container's; devices and device cgroup rules; capabilities
//! beyond docker's defaults; seccomp, AppArmor or SELinux settings other than docker's
//! defaults, unconfined system paths; sysctls outside the baseline's list; a cgroup parent,
//! a negative OOM score; host paths outside the app's own dirs, or under a dir the app can
//! write (a symlink planted there is followed at the next start), as bind mounts or as local
//! volumes; local volume options that mount anything but a remote file system or such a
//! bind; volumes, networks and `volumes_from` of other projects. What the compose CLI itself
//! reads of the host is judged before it runs, in [`crate::work::reads`].

use crate::sys::docker::{Created, HostConfig, Mount, NetworkInfo, VolumeInfo};
use crate::work::yaml::{self, Yaml};
use std::collections::BTreeMap;
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

/// SELinux types a container may run as (`label=type:`): the baseline's list.
const SELINUX_TYPES: &[&str] = &[
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// Mount options any local volume may have.
const COMMON_OPTS: &[&str] = &[
    "ro", "rw", "nosuid", "nodev", "noexec", "noatime", "relatime",
];
const NFS_OPTS: &[&str] = &[
    "addr", "vers", "nfsvers", "proto", "port", "soft", "hard", "timeo", "retrans", "rsize",
    "wsize", "nolock", "tcp", "udp", "sec", "actimeo", "intr", "nointr", "noac",
];
const CIFS_OPTS: &[&str] = &[
    "addr",
    "username",
    "password",
    "domain",
    "vers",
    "uid",
    "gid",
    "file_mode",
    "dir_mode",
    "sec",
    "noserverino",
    "nounix",
    "iocharset",
    "seal",
];
const TMPFS_OPTS: &[&str] = &["size", "mode", "uid", "gid", "nr_inodes", "nr_blocks"];
/// Local volume types whose `device` is not a path on this host, with the options each may
/// take: docker's local driver turns others (`bind`, `move`...) into mount flags that reach
/// the host's files whatever the type.
const REMOTE_TYPES: &[(&str, &[&str])] = &[
    ("nfs", NFS_OPTS),
    ("nfs4", NFS_OPTS),
    ("cifs", CIFS_OPTS),
    ("smb3", CIFS_OPTS),
    ("tmpfs", TMPFS_OPTS),
];
/// A local volume over a host dir (`o: bind`, `device` the dir).
const BIND_OPTS: &[&str] = &["bind", "rbind"];

/// The label compose puts on every container, network and volume of a project.
const PROJECT_LABEL: &str = "com.docker.compose.project";

/// One refused setting: the service (empty for a top-level key), its compose key and what it
/// asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub service: String,
    pub key: &'static str,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.service.as_str() {
            "" => write!(f, "top-level `{}` {}", self.key, self.what),
            s => write!(f, "service {s}: `{}` {}", self.key, self.what),
        }
    }
}

/// What a project's containers are judged against.
pub struct Rules<'a> {
    pub project: &'a str,
    /// Host dirs the project may mount: its own files and the app's workspace.
    pub roots: Vec<PathBuf>,
    /// Host dirs the app writes outside of this deploy (the workspace): nothing under them
    /// may be mounted.
    pub writable: Vec<PathBuf>,
    /// The project's named volumes, as `docker volume inspect` shows them.
    pub volumes: &'a [VolumeInfo],
    /// The networks its containers are connected to, as `docker network inspect` shows them.
    pub networks: &'a [NetworkInfo],
}

/// Resolved host paths: where mounts may come from, and what the project can write.
struct Paths {
    roots: Vec<PathBuf>,
    writable: Vec<PathBuf>,
}

/// Every violation of every container of the project, in container order.
pub fn judge(containers: &[Created], rules: &Rules) -> Vec<Violation> {
    let roots: Vec<PathBuf> = rules.roots.iter().map(|r| resolve(r)).collect();
    let paths = Paths {
        writable: writable(containers, rules, &roots),
        roots,
    };
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
        networks(c, rules, &mut add);
        for m in c.mounts.iter().flatten() {
            if let Some(what) = mount(m, &paths, rules) {
                let secret = m.destination.starts_with("/run/secrets/");
                add(if secret { "secrets" } else { "volumes" }, what);
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
    for o in h.security_opt.iter().flatten().filter(|o| !confined(o)) {
        // A seccomp profile arrives as its JSON: name its start only.
        let shown: String = o.chars().take(60).collect();
        let cut = if shown.len() < o.len() { "..." } else { "" };
        add("security_opt", format!("sets {shown}{cut}"));
    }
    for k in h.sysctls.iter().flatten().map(|(k, _)| k) {
        if !SYSCTLS.contains(&k.as_str()) {
            add("sysctls", format!("sets {k}"));
        }
    }
    if !h.cgroup_parent.is_empty() {
        add("cgroup_parent", format!("is {:?}", h.cgroup_parent));
    }
    if h.oom_score_adj < 0 {
        add("oom_score_adj", format!("is {}", h.oom_score_adj));
    }
}

/// Whether a `security_opt` entry keeps docker's confinement: its default seccomp and
/// AppArmor profiles, SELinux types of containers, `no-new-privileges`. Anything else (a
/// profile file, which the CLI inlines as JSON, a host AppArmor profile, an unknown option)
/// is refused.
fn confined(o: &str) -> bool {
    let (k, v) = o.split_once(['=', ':']).unwrap_or((o, ""));
    match k {
        "no-new-privileges" => true,
        "seccomp" => v == "builtin",
        "apparmor" => v == "docker-default",
        "label" => match v.split_once(':') {
            Some(("level", _)) => true,
            Some(("type", t)) => SELINUX_TYPES.contains(&t),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `name` (a full id, as compose writes them, or a name) is one of the project's
/// containers. Not an id prefix: docker would look a short one up as a name first.
fn ours(name: &str, own: &[Created]) -> bool {
    own.iter()
        .any(|c| c.id == name || c.name.trim_start_matches('/') == name)
}

/// The container's networks: docker's own bridge (where every single-container app runs) or
/// networks this project created; another project's would reach its unpublished services.
fn networks(c: &Created, rules: &Rules, add: &mut dyn FnMut(&'static str, String)) {
    let mode = &c.host_config.network_mode;
    let joined = c
        .networks
        .iter()
        .flat_map(|n| n.keys())
        .filter(|n| *n != mode);
    for net in std::iter::once(mode).chain(joined) {
        let special = ["", "default", "bridge", "none", "host"].contains(&net.as_str())
            || net.starts_with("container:");
        let own = rules
            .networks
            .iter()
            .any(|n| n.name == *net && label(&n.labels).is_some_and(|p| p == rules.project));
        if !special && !own {
            // compose sets the first network as the mode too: name the key the file used.
            let key = if net == mode {
                "network_mode"
            } else {
                "networks"
            };
            add(key, format!("joins network {net}, not one of this project"));
        }
    }
}

fn label(labels: &Option<BTreeMap<String, String>>) -> Option<&str> {
    labels.as_ref()?.get(PROJECT_LABEL).map(String::as_str)
}

/// Networks of the normalised config that compose would join rather than create for this
/// project: `external` ones and ones given a `name:` of their own. v1 connects a service's
/// second network only when it starts it, so the engine cannot show those before.
pub fn config_networks(config: &Yaml, project: &str) -> Vec<Violation> {
    let defs = yaml::get(config, "networks");
    let mut out = Vec::new();
    for (service, s) in yaml::entries(yaml::get(config, "services").unwrap_or(&Yaml::Null)) {
        let used: Vec<&str> = match yaml::get(s, "networks") {
            Some(Yaml::Hash(h)) => h.keys().filter_map(Yaml::as_str).collect(),
            Some(list) => yaml::strings(list, ""),
            None if yaml::get(s, "network_mode").is_none() => vec!["default"],
            None => vec![],
        };
        for key in used {
            let def = defs.and_then(|d| yaml::get(d, key)).unwrap_or(&Yaml::Null);
            let external = yaml::get(def, "external").is_some_and(|e| *e != Yaml::Boolean(false));
            let own = format!("{project}_{key}");
            let name = yaml::get(def, "name").and_then(Yaml::as_str);
            if external || name.is_some_and(|n| n != own) {
                out.push(Violation {
                    service: service.into(),
                    key: "networks",
                    what: format!(
                        "joins network {}, which this project does not create",
                        name.unwrap_or(key)
                    ),
                });
            }
        }
    }
    out
}

/// Labels under `muvee.` that a service of the normalised config sets itself: they are the
/// agent's proof of ownership (which app, which node), so only our override may set them.
pub fn config_labels(config: &Yaml) -> Vec<Violation> {
    let mut out = Vec::new();
    for (service, s) in yaml::entries(yaml::get(config, "services").unwrap_or(&Yaml::Null)) {
        let keys: Vec<&str> = match yaml::get(s, "labels") {
            Some(m @ Yaml::Hash(_)) => yaml::entries(m).into_iter().map(|(k, _)| k).collect(),
            Some(list) => yaml::strings(list, "")
                .into_iter()
                .map(|l| l.split_once('=').map_or(l, |(k, _)| k))
                .collect(),
            None => vec![],
        };
        for key in keys.into_iter().filter(|k| k.trim().starts_with("muvee.")) {
            out.push(Violation {
                service: service.into(),
                key: "labels",
                what: format!("sets {key}, a label only the agent sets"),
            });
        }
    }
    out
}

/// Host paths the project's containers can write: the workspace, read-write bind mounts,
/// and the dirs of local bind volumes (those inside `roots`: the others are refused anyway).
fn writable(containers: &[Created], rules: &Rules, roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = rules.writable.iter().map(|p| resolve(p)).collect();
    for m in containers.iter().flat_map(|c| c.mounts.iter().flatten()) {
        match m.kind.as_str() {
            "bind" if m.rw => out.push(resolve(Path::new(&m.source))),
            "volume" => {
                let opts = find_volume(m, rules).and_then(|v| v.options.as_ref());
                if let Some(dev) = opts.and_then(bind_device) {
                    out.push(resolve(Path::new(dev)));
                }
            }
            _ => {}
        }
    }
    out.retain(|w| roots.iter().any(|r| w.starts_with(r)));
    out
}

fn find_volume<'a>(m: &Mount, rules: &Rules<'a>) -> Option<&'a VolumeInfo> {
    let name = m.name.as_deref()?;
    rules.volumes.iter().find(|v| v.name == name)
}

/// A local volume's `device`, when its options make it a bind of that host path.
fn bind_device(opts: &BTreeMap<String, String>) -> Option<&str> {
    let o = opts.get("o")?;
    let bind = o.split(',').any(|x| BIND_OPTS.contains(&x.trim()));
    bind.then(|| opts.get("device").map_or("", String::as_str))
}

/// Why a mount is refused, if it is.
fn mount(m: &Mount, paths: &Paths, rules: &Rules) -> Option<String> {
    match m.kind.as_str() {
        "bind" => host_path(&m.source, paths),
        "volume" => {
            let name = m.name.as_deref().unwrap_or("");
            let Some(v) = find_volume(m, rules) else {
                return Some(format!("mounts volume {name}, which docker did not show"));
            };
            match label(&v.labels) {
                Some(p) if p != rules.project => {
                    return Some(format!("mounts volume {name} of another project"))
                }
                // Docker names an anonymous volume with 64 hex digits and no labels.
                None if !(name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())) => {
                    return Some(format!("mounts volume {name}, not one of this project"))
                }
                _ => {}
            }
            if v.driver != "local" {
                return Some(format!(
                    "volume {name} uses driver {}; only local volumes can be judged",
                    v.driver
                ));
            }
            let opts = v.options.as_ref().filter(|o| !o.is_empty())?;
            volume_options(opts, paths).map(|w| format!("volume {name} {w}"))
        }
        _ => None,
    }
}

/// Why a local volume's driver options are refused: a bind must be of a host path the
/// project may mount; otherwise only a remote or tmpfs file system, with its known options.
fn volume_options(opts: &BTreeMap<String, String>, paths: &Paths) -> Option<String> {
    let kind = opts.get("type").map_or("", String::as_str);
    let bind = bind_device(opts);
    let allowed = match REMOTE_TYPES.iter().find(|(t, _)| *t == kind) {
        _ if bind.is_some() => BIND_OPTS,
        Some((_, allowed)) => allowed,
        None => {
            return Some(format!(
                "has type {kind:?}, neither a remote file system nor a bind"
            ))
        }
    };
    let o = opts.get("o").map_or("", String::as_str);
    let key = |x: &str| x.split('=').next().unwrap_or("").trim().to_string();
    let odd = o
        .split(',')
        .map(key)
        .filter(|k| !k.is_empty())
        .find(|k| !allowed.contains(&k.as_str()) && !COMMON_OPTS.contains(&k.as_str()));
    if let Some(k) = odd {
        return Some(format!(
            "has mount option {k:?}, not one a {kind:?} volume may have"
        ));
    }
    bind.and_then(|dev| host_path(dev, paths))
}

/// Why a host path may not be mounted: outside the project's dirs, or under a dir the app
/// can write, where it could become a symlink docker follows at the next start.
fn host_path(p: &str, paths: &Paths) -> Option<String> {
    let r = resolve(Path::new(p));
    // A `..` left in it could not be resolved: it may climb out of any root.
    let climbs = r.components().any(|c| c == Component::ParentDir);
    if climbs || !paths.roots.iter().any(|root| r.starts_with(root)) {
        return Some(format!(
            "mounts host path {p}, outside the project's files and workspace"
        ));
    }
    let under = paths
        .writable
        .iter()
        .find(|w| r != **w && r.starts_with(w))?;
    Some(format!(
        "mounts host path {p}, inside {} which the app can write",
        under.display()
    ))
}

/// `p` with every symlink of its longest existing ancestor resolved: where a mount of it
/// lands. What does not exist yet is created by docker as a directory, below that.
pub fn resolve(p: &Path) -> PathBuf {
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

    fn container(service: &str, h: HostConfig, mounts: Vec<Mount>) -> Created {
        Created {
            id: format!("{service:0>12}deadbeef"),
            name: format!("/muvee-p-{service}-1"),
            status: "created".into(),
            service: service.into(),
            host_config: h,
            mounts: Some(mounts),
            networks: None,
        }
    }

    fn bind(source: &Path, rw: bool) -> Mount {
        Mount {
            kind: "bind".into(),
            source: source.display().to_string(),
            destination: "/x".into(),
            rw,
            name: None,
        }
    }

    fn volume(name: &str) -> Mount {
        Mount {
            kind: "volume".into(),
            source: format!("/var/lib/docker/volumes/{name}/_data"),
            destination: "/v".into(),
            rw: true,
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

    fn rules<'a>(
        roots: &[&Path],
        volumes: &'a [VolumeInfo],
        networks: &'a [NetworkInfo],
    ) -> Rules<'a> {
        Rules {
            project: "muvee-p",
            roots: roots.iter().map(|p| p.to_path_buf()).collect(),
            writable: roots.get(1).map(|p| p.to_path_buf()).into_iter().collect(),
            volumes,
            networks,
        }
    }

    fn texts(v: Vec<Violation>) -> Vec<String> {
        v.iter().map(|v| v.to_string()).collect()
    }

    /// src and ws under a fresh temp dir.
    fn dirs(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("muvee-policy-{name}-{}", std::process::id()));
        let (src, ws) = (dir.join("src"), dir.join("ws"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&ws).unwrap();
        (dir, src, ws)
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
                format!(
                    "seccomp={{\"defaultAction\":\"SCMP_ACT_ALLOW\",{}}}",
                    " ".repeat(80)
                ),
                "apparmor=host-profile".into(),
                "apparmor=docker-default".into(),
                "label=type:spc_t".into(),
                "label=type:container_t".into(),
                "label=level:s0:c100,c200".into(),
                "label=user:system_u".into(),
                "seccomp=builtin".into(),
                "writable-cgroups=true".into(),
            ]),
            sysctls: map(&[("kernel.msgmax", "1"), ("net.ipv4.tcp_syncookies", "1")]),
            volumes_from: Some(vec!["muvee-other:ro".into()]),
            cgroup_parent: "/".into(),
            oom_score_adj: -1000,
        };
        let c = container("side", h, vec![]);
        let v = judge(&[c], &rules(&[], &[], &[]));
        assert_eq!(
            texts(v),
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
                "service side: `security_opt` sets seccomp={\"defaultAction\":\"SCMP_ACT_ALLOW\",                  ...",
                "service side: `security_opt` sets apparmor=host-profile",
                "service side: `security_opt` sets label=type:spc_t",
                "service side: `security_opt` sets label=user:system_u",
                "service side: `security_opt` sets writable-cgroups=true",
                "service side: `sysctls` sets kernel.msgmax",
                "service side: `cgroup_parent` is \"/\"",
                "service side: `oom_score_adj` is -1000",
            ]
        );
    }

    #[test]
    fn the_projects_own_containers_dirs_and_volumes_are_allowed() {
        let (dir, src, ws) = dirs("own");
        // A symlink in the repository does not make the host reachable.
        std::os::unix::fs::symlink("/", src.join("up")).unwrap();
        let anon = "ab".repeat(32);
        let volumes = [
            vol("muvee-p_data", "muvee-p", &[]),
            vol(
                "muvee-p_nfs",
                "muvee-p",
                &[
                    ("type", "nfs"),
                    ("device", ":/export"),
                    ("o", "addr=10.0.0.1,rw,vers=4"),
                ],
            ),
            vol(
                "muvee-p_tmp",
                "muvee-p",
                &[
                    ("type", "tmpfs"),
                    ("device", "tmpfs"),
                    ("o", "size=1m,uid=1000"),
                ],
            ),
            vol(
                "muvee-p_host",
                "muvee-p",
                &[("o", "bind"), ("device", "/etc")],
            ),
            vol("muvee-q_data", "muvee-q", &[]),
            VolumeInfo {
                name: anon.clone(),
                driver: "local".into(),
                ..VolumeInfo::default()
            },
            VolumeInfo {
                name: "registry-data".into(),
                driver: "local".into(),
                ..VolumeInfo::default()
            },
        ];
        let a = container("a", HostConfig::default(), vec![]);
        let b = container(
            "b",
            HostConfig {
                network_mode: format!("container:{}", a.id),
                pid_mode: "container:muvee-p-a-1".into(),
                cap_add: Some(vec!["NET_BIND_SERVICE".into(), "CAP_NET_RAW".into()]),
                sysctls: map(&[("net.ipv4.ip_unprivileged_port_start", "0")]),
                security_opt: Some(vec![
                    "no-new-privileges".into(),
                    "label=type:container_t".into(),
                ]),
                ..HostConfig::default()
            },
            vec![
                bind(&src.join("conf/nginx.conf"), false),
                bind(&ws, true),
                volume("muvee-p_data"),
                volume("muvee-p_nfs"),
                volume("muvee-p_tmp"),
                volume(&anon),
                volume("muvee-p_host"),
                volume("muvee-q_data"),
                volume("registry-data"),
                bind(&src.join("up/etc"), false),
                bind(&src.join("../ws/../.."), false),
                bind(Path::new("/var/run/docker.sock"), true),
            ],
        );
        let text = texts(judge(&[a, b], &rules(&[&src, &ws], &volumes, &[])));
        let outside = "outside the project's files and workspace";
        assert_eq!(
            text,
            [
                format!(
                    "service b: `volumes` volume muvee-p_host mounts host path /etc, {outside}"
                ),
                "service b: `volumes` mounts volume muvee-q_data of another project".into(),
                "service b: `volumes` mounts volume registry-data, not one of this project".into(),
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

    #[test]
    fn volume_options_that_reach_host_files_are_refused() {
        let (dir, src, ws) = dirs("opts");
        let volumes = [
            // The attack: docker's local driver turns `o: bind` into a bind of `device`.
            vol(
                "muvee-p_t",
                "muvee-p",
                &[("type", "tmpfs"), ("device", "/"), ("o", "bind")],
            ),
            vol(
                "muvee-p_n",
                "muvee-p",
                &[("type", "nfs"), ("device", "/"), ("o", "rbind,ro")],
            ),
            vol(
                "muvee-p_m",
                "muvee-p",
                &[("type", "tmpfs"), ("device", "/mnt"), ("o", "move")],
            ),
            vol(
                "muvee-p_o",
                "muvee-p",
                &[("type", "overlay"), ("device", "x"), ("o", "lowerdir=/etc")],
            ),
            vol(
                "muvee-p_d",
                "muvee-p",
                &[("type", "ext4"), ("device", "/dev/sda1")],
            ),
            vol(
                "muvee-p_ws",
                "muvee-p",
                &[
                    ("type", "none"),
                    ("device", ws.to_str().unwrap()),
                    ("o", "bind"),
                ],
            ),
            VolumeInfo {
                driver: "local-persist".into(),
                ..vol("muvee-p_plugin", "muvee-p", &[("mountpoint", "/")])
            },
        ];
        let mounts = volumes.iter().map(|v| volume(&v.name)).collect();
        let c = container("a", HostConfig::default(), mounts);
        let text = texts(judge(&[c], &rules(&[&src, &ws], &volumes, &[])));
        assert_eq!(
            text,
            [
                "service a: `volumes` volume muvee-p_t mounts host path /, outside the project's files and workspace",
                "service a: `volumes` volume muvee-p_n mounts host path /, outside the project's files and workspace",
                "service a: `volumes` volume muvee-p_m has mount option \"move\", not one a \"tmpfs\" volume may have",
                "service a: `volumes` volume muvee-p_o has type \"overlay\", neither a remote file system nor a bind",
                "service a: `volumes` volume muvee-p_d has type \"ext4\", neither a remote file system nor a bind",
                "service a: `volumes` volume muvee-p_plugin uses driver local-persist; only local volumes can be judged",
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_under_a_dir_the_app_writes_may_be_mounted() {
        let (dir, src, ws) = dirs("rw");
        let (repo, host) = (src.clone(), src.join("hostroot"));
        let volumes = [vol(
            "muvee-p_data",
            "muvee-p",
            &[
                ("o", "bind"),
                ("device", src.join("data").to_str().unwrap()),
            ],
        )];
        let mut secret = bind(&src.join("data/s"), false);
        secret.destination = "/run/secrets/s".into();
        let a = container(
            "a",
            HostConfig::default(),
            vec![
                bind(&repo, true),
                bind(&host, false),
                bind(&ws.join("sub"), false),
            ],
        );
        let b = container(
            "b",
            HostConfig::default(),
            vec![
                volume("muvee-p_data"),
                secret,
                bind(&ws, false),
                bind(&src, false),
            ],
        );
        let text = texts(judge(&[a, b], &rules(&[&src, &ws], &volumes, &[])));
        let under = |p: &Path, w: &Path| {
            format!(
                "mounts host path {}, inside {} which the app can write",
                p.display(),
                w.display()
            )
        };
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            text,
            [
                format!("service a: `volumes` {}", under(&host, &real(&src))),
                format!(
                    "service a: `volumes` {}",
                    under(&ws.join("sub"), &real(&ws))
                ),
                format!(
                    "service b: `volumes` volume muvee-p_data {}",
                    under(&src.join("data"), &real(&src))
                ),
                format!(
                    "service b: `secrets` {}",
                    under(&src.join("data/s"), &real(&src))
                ),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn networks_of_other_projects_are_refused_bridge_is_allowed() {
        let net = |name: &str, project: Option<&str>| NetworkInfo {
            name: name.into(),
            labels: project.and_then(|p| map(&[(PROJECT_LABEL, p)])),
        };
        let nets = [
            net("muvee-p_default", Some("muvee-p")),
            net("muvee-q_default", Some("muvee-q")),
            net("shared", None),
        ];
        let on = |service: &str, mode: &str, joined: &[&str]| Created {
            networks: Some(
                joined
                    .iter()
                    .map(|n| (n.to_string(), serde::de::IgnoredAny))
                    .collect(),
            ),
            ..container(
                service,
                HostConfig {
                    network_mode: mode.into(),
                    ..HostConfig::default()
                },
                vec![],
            )
        };
        let all = [
            on("a", "muvee-p_default", &["muvee-p_default"]),
            on("b", "bridge", &["bridge"]),
            on("c", "none", &[]),
            on(
                "d",
                "muvee-q_default",
                &["muvee-q_default", "muvee-p_default", "shared"],
            ),
            on("e", "shared", &[]),
        ];
        let text = texts(judge(&all, &rules(&[], &[], &nets)));
        assert_eq!(
            text,
            [
                "service d: `network_mode` joins network muvee-q_default, not one of this project",
                "service d: `networks` joins network shared, not one of this project",
                "service e: `network_mode` joins network shared, not one of this project",
            ]
        );
        let config = yaml::load(
            "services:\n  a: {image: i}\n  b: {image: i, networks: [x, y, z]}\n  c: {image: i, networks: {w: {aliases: [q]}}}\n  d: {image: i, network_mode: bridge}\nnetworks:\n  default: {name: muvee-p_default}\n  x: {external: true, name: muvee-q_default}\n  y: {name: muvee-q_default}\n  z: {}\n  w: {external: {name: other}}\n",
        )
        .unwrap();
        assert_eq!(
            texts(config_networks(&config, "muvee-p")),
            [
                "service b: `networks` joins network muvee-q_default, which this project does not create",
                "service b: `networks` joins network muvee-q_default, which this project does not create",
                "service c: `networks` joins network w, which this project does not create",
            ]
        );
    }

    #[test]
    fn services_may_not_set_the_agents_labels() {
        let config = yaml::load(
            "services:\n  a: {image: i, labels: {muvee.domain_prefix: victim, app: x}}\n  b: {image: i, labels: [\"muvee.node=n1\", \"other=1\", muvee.managed]}\n  c: {image: i, labels: {muvee_x: y}}\n",
        )
        .unwrap();
        assert_eq!(
            texts(config_labels(&config)),
            [
                "service a: `labels` sets muvee.domain_prefix, a label only the agent sets",
                "service b: `labels` sets muvee.node, a label only the agent sets",
                "service b: `labels` sets muvee.managed, a label only the agent sets",
            ]
        );
    }
}
