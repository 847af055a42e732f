//! dev-cp: a muvee control plane for development, demos and the benchmark. Serves the agent
//! endpoints with today's server's shapes (or the March 2026 server's), keeps nodes, tasks,
//! deployments and logs in memory, and chains a completed build into a deploy task on a deploy
//! node as today's server does. Not linked into the agent: `cargo run --example dev-cp`.
//!
//! ```text
//! dev-cp serve [--listen 127.0.0.1:8080] [--secret S] [--registry ADDR] [--registry-user U]
//!              [--registry-password P] [--dataset-nfs-base-path DIR] [--volume-nfs-base-path DIR]
//!              [--march] [--chain-interval-ms 5000] [--log-delay-ms 0] [--port-file F]
//!              [--tls-cert CHAIN.pem --tls-key KEY.pem]   (https on --listen: tls.rs)
//! dev-cp build <git_url> [--branch B] [--prefix P] [--port N] [--memory M]
//!              [--dataset NAME=NFS_PATH[@VERSION]] [--env K=V]...   (then the chained deploy)
//! dev-cp deploy <image> [same options]
//! dev-cp tasks | deployments | nodes | stats
//! dev-cp task <id>            one task as JSON
//! dev-cp logs <deployment>    the deployment's stored log
//! dev-cp exec <container> [--node ID] -- <cmd>...   through a deploy agent's control channel
//! dev-cp fault <route> <fault> <secs>   e.g. `fault logs 502 30`, `fault poll hang:20000 60`
//! dev-cp fault clear | fault   end every fault | list the active ones
//! ```
//! Fault routes: poll, complete, logs, register, config, metrics, health, control, all; faults:
//! a status 400-599, html, garbage, reset, hang:MS, slow:MS (see faults.rs).
//! Client commands talk to `--url` or `$DEV_CP_URL` (default http://127.0.0.1:8080).

mod faults;
mod server;
mod tls;

use serde_json::{json, Value};
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let url = take_opt(&mut args, "--url")
        .or_else(|| std::env::var("DEV_CP_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let url = url.trim_end_matches('/').to_string();
    if args.is_empty() {
        eprintln!("usage: dev-cp serve|build|deploy|tasks|task|deployments|nodes|stats|logs|exec|fault (see examples/dev-cp/main.rs)");
        return ExitCode::from(2);
    }
    let cmd = args.remove(0);
    let res = match cmd.as_str() {
        "serve" => serve(args),
        "build" | "deploy" => enqueue(&url, &cmd, args),
        "exec" => exec(&url, args),
        "tasks" => get(&url, "/dev/tasks").map(|v| print_tasks(&v)),
        "task" | "logs" if args.len() == 1 => {
            let path = format!(
                "/dev/{}/{}",
                if cmd == "task" { "tasks" } else { "logs" },
                args[0]
            );
            request(&url, "GET", &path, None).map(|t| print!("{t}"))
        }
        "fault" => fault(&url, &args),
        "deployments" | "nodes" | "stats" => get(&url, &format!("/dev/{cmd}"))
            .map(|v| println!("{}", serde_json::to_string_pretty(&v).unwrap())),
        _ => Err(format!(
            "unknown command or arguments: {cmd} {}",
            args.join(" ")
        )),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dev-cp: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Removes `--name VALUE` (or `--name=VALUE`) from `args`, the last one if repeated.
fn take_opt(args: &mut Vec<String>, name: &str) -> Option<String> {
    take_all(args, name).pop()
}

fn take_all(args: &mut Vec<String>, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == name && i + 1 < args.len() {
            out.push(args.remove(i + 1));
            args.remove(i);
        } else if let Some(v) = args[i].strip_prefix(&format!("{name}=")) {
            out.push(v.to_string());
            args.remove(i);
        } else {
            i += 1;
        }
    }
    out
}

fn take_flag(args: &mut Vec<String>, name: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != name);
    args.len() != before
}

fn millis(v: Option<String>, default: u64) -> Result<Duration, String> {
    match v {
        None => Ok(Duration::from_millis(default)),
        Some(s) => s
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("not milliseconds: {s}")),
    }
}

fn serve(mut args: Vec<String>) -> Result<(), String> {
    let listen = take_opt(&mut args, "--listen").unwrap_or_else(|| "127.0.0.1:8080".into());
    let secret = take_opt(&mut args, "--secret").unwrap_or_else(|| "dev-secret".into());
    let version = if take_flag(&mut args, "--march") {
        server::Version::March
    } else {
        server::Version::Today
    };
    let opts = server::Options {
        record: false,
        dev_routes: true,
        log_delay: millis(take_opt(&mut args, "--log-delay-ms"), 0)?,
        chain_interval: millis(take_opt(&mut args, "--chain-interval-ms"), 5000)?,
    };
    let config = [
        ("registry_addr", "--registry"),
        ("registry_user", "--registry-user"),
        ("registry_password", "--registry-password"),
        ("dataset_nfs_base_path", "--dataset-nfs-base-path"),
        ("volume_nfs_base_path", "--volume-nfs-base-path"),
        ("base_domain", "--base-domain"),
    ];
    let config: Vec<(&str, Option<String>)> = config
        .iter()
        .map(|(k, f)| (*k, take_opt(&mut args, f)))
        .collect();
    let port_file = take_opt(&mut args, "--port-file");
    let tls = match (
        take_opt(&mut args, "--tls-cert"),
        take_opt(&mut args, "--tls-key"),
    ) {
        (Some(c), Some(k)) => Some(read_tls(&c, &k)?),
        (None, None) => None,
        _ => return Err("serve: --tls-cert and --tls-key go together".into()),
    };
    if !args.is_empty() {
        return Err(format!("serve: unknown arguments {args:?}"));
    }
    // With TLS the server itself listens on a loopback port behind the https front.
    let plain = if tls.is_some() {
        "127.0.0.1:0"
    } else {
        listen.as_str()
    };
    let listener = TcpListener::bind(plain).map_err(|e| format!("listen on {plain}: {e}"))?;
    let mut port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some((chain, key)) = tls {
        port = tls::TlsFront::start(&listen, chain, key, format!("127.0.0.1:{port}"))?.port;
    }
    let srv = server::Server::serve(listener, version, &secret, opts);
    faults::Faults::default().install(&srv, true);
    for (k, v) in config {
        if let Some(v) = v {
            srv.set_config(k, &v);
        }
    }
    if let Some(f) = port_file {
        std::fs::write(&f, format!("{port}\n")).map_err(|e| format!("write {f}: {e}"))?;
    }
    eprintln!("dev-cp: {version:?} server's agent API on {scheme}://127.0.0.1:{port} (secret {secret:?}), dev routes under /dev/");
    loop {
        std::thread::park();
    }
}

/// The certificate chain and private key of `--tls-cert` and `--tls-key` (PEM).
type Tls = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn read_tls(cert: &str, key: &str) -> Result<Tls, String> {
    use ureq::tls::PemItem;
    let read = |f: &str| std::fs::read(f).map_err(|e| format!("read {f}: {e}"));
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let mut chain = Vec::new();
    for item in ureq::tls::parse_pem(&cert_pem) {
        if let Ok(PemItem::Certificate(c)) = item {
            chain.push(c.der().to_vec().into());
        }
    }
    let key = ureq::tls::parse_pem(&key_pem)
        .find_map(|i| match i {
            Ok(PemItem::PrivateKey(k)) => {
                rustls::pki_types::PrivateKeyDer::try_from(k.der().to_vec()).ok()
            }
            _ => None,
        })
        .ok_or_else(|| format!("{key}: no private key"))?;
    if chain.is_empty() {
        return Err(format!("{cert}: no certificate"));
    }
    Ok((chain, key))
}

/// `fault ROUTE FAULT SECS`, `fault clear`, or `fault` (the active faults).
fn fault(url: &str, args: &[String]) -> Result<(), String> {
    let query = match args {
        [] => String::new(),
        [c] if c == "clear" => "?clear".into(),
        [route, fault, secs] => format!("?route={route}&fault={fault}&secs={secs}"),
        _ => return Err("fault ROUTE FAULT SECS | fault clear | fault".into()),
    };
    request(url, "GET", &format!("/dev/faults{query}"), None).map(|t| print!("{t}"))
}

fn enqueue(url: &str, cmd: &str, mut args: Vec<String>) -> Result<(), String> {
    let mut body = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    };
    put(
        "git_branch",
        take_opt(&mut args, "--branch").map(Value::from),
    );
    put(
        "dockerfile_path",
        take_opt(&mut args, "--dockerfile").map(Value::from),
    );
    put(
        "domain_prefix",
        take_opt(&mut args, "--prefix").map(Value::from),
    );
    put(
        "memory_limit",
        take_opt(&mut args, "--memory").map(Value::from),
    );
    let port = take_opt(&mut args, "--port")
        .map(|p| p.parse::<u64>().map_err(|_| format!("bad --port {p}")));
    put("container_port", port.transpose()?.map(Value::from));
    let mut datasets = Vec::new();
    for d in take_all(&mut args, "--dataset") {
        let (name, rest) = d
            .split_once('=')
            .ok_or(format!("--dataset {d}: NAME=NFS_PATH[@VERSION]"))?;
        let (path, version) = rest.rsplit_once('@').unwrap_or((rest, "1"));
        let version: u64 = version
            .parse()
            .map_err(|_| format!("--dataset {d}: bad version"))?;
        datasets.push(
            json!({"id": format!("{:0>8}-0000-4000-8000-000000000000", hex8(name)),
            "name": name, "nfs_path": path, "version": version, "size_bytes": 0,
            "mount_mode": "dependency"}),
        );
    }
    if !datasets.is_empty() {
        put("datasets", Some(Value::Array(datasets)));
    }
    let mut env = serde_json::Map::new();
    for kv in take_all(&mut args, "--env") {
        let (k, v) = kv.split_once('=').ok_or(format!("--env {kv}: K=V"))?;
        env.insert(k.into(), v.into());
    }
    put("env_vars", (!env.is_empty()).then_some(Value::Object(env)));
    let [target] = &args[..] else {
        return Err(format!(
            "{cmd}: give one {}",
            if cmd == "build" { "git URL" } else { "image" }
        ));
    };
    body.insert(
        (if cmd == "build" {
            "git_url"
        } else {
            "image_tag"
        })
        .into(),
        target.clone().into(),
    );
    let out = request(
        url,
        "POST",
        &format!("/dev/{cmd}"),
        Some(Value::Object(body).to_string()),
    )?;
    print!("{out}");
    Ok(())
}

/// Runs a command in a container as `muveectl exec` does; prints its output, and fails
/// when it exits non-zero.
fn exec(url: &str, mut args: Vec<String>) -> Result<(), String> {
    let usage = || "exec: give <container> [--node ID] -- <cmd>...".to_string();
    let node = take_opt(&mut args, "--node");
    let dashes = args.iter().position(|a| a == "--").ok_or_else(usage)?;
    let cmd = args.split_off(dashes + 1);
    let [container, _] = &args[..] else {
        return Err(usage());
    };
    let mut body = json!({"container": container, "cmd": cmd});
    if let Some(node) = node {
        body["node_id"] = node.into();
    }
    let out = request(url, "POST", "/dev/exec", Some(body.to_string()))?;
    let out: Value = serde_json::from_str(&out).map_err(|e| format!("/dev/exec: {e}"))?;
    print!("{}", out["output"].as_str().unwrap_or(""));
    match out["code"].as_i64().unwrap_or(-1) {
        0 => Ok(()),
        code => Err(format!("the command exited with {code}")),
    }
}

/// A stable dataset id from its name (the same dataset across deploys is cached once).
fn hex8(name: &str) -> String {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{h:08x}")
}

fn get(url: &str, path: &str) -> Result<Value, String> {
    let text = request(url, "GET", path, None)?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))
}

fn request(url: &str, method: &str, path: &str, body: Option<String>) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let full = format!("{url}{path}");
    let res = match body {
        Some(b) => agent.post(&full).content_type("application/json").send(b),
        None => agent.get(&full).call(),
    };
    let mut res = res.map_err(|e| format!("{method} {full}: {e}"))?;
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{method} {full}: {status} {}", text.trim()));
    }
    Ok(text)
}

fn print_tasks(v: &Value) {
    println!(
        "{:<36}  {:<8}  {:<10}  {:<26}  result",
        "task", "type", "status", "node"
    );
    for t in v.as_array().into_iter().flatten() {
        let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<36}  {:<8}  {:<10}  {:<26}  {}",
            s("id"),
            s("type"),
            s("status"),
            s("node"),
            s("result")
        );
    }
}
