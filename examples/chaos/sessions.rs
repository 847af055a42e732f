//! exec and cp sessions through the deploy agent's control channel, as `muveectl` opens them
//! (the dev control plane's side of the channel, `examples/dev-cp/control.rs`). One at a time:
//! a connection's reader hands each caller only its own session's frames.

use crate::hist::Ev;
use crate::plan::Role;
use crate::World;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a session may stay silent before it counts as never ending.
const END_WITHIN: Duration = Duration::from_secs(30);

pub fn start(w: &Arc<World>, step: usize, project: usize, kind: &'static str) -> JoinHandle<()> {
    let w = w.clone();
    std::thread::spawn(move || {
        let _one = w.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (ok, detail) = match session(&w, step, project, kind) {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        if !ok {
            println!(
                "{:>8.3}s   #{step} session {kind}: {detail}",
                w.hist.clock.ms() as f64 / 1000.0
            );
        }
        w.hist.push(Ev::Session { step, ok, detail });
    })
}

/// Ok: how it ended as it must; Err: how it did not.
fn session(w: &World, step: usize, project: usize, kind: &str) -> Result<String, String> {
    let Some(node) = w.cp.node_id_for_role(Role::Deploy.name()) else {
        return Ok("no deploy node yet".into());
    };
    let Some(conn) = w.cp.control().conn(&node) else {
        return Ok("no control connection (agent down, or the channel refused)".into());
    };
    let container = format!("muvee-{}", w.names[project]);
    let id = format!("chaos-{step}");
    let sent = match kind {
        "exec" => conn.open_exec(&id, &container, &["sh", "-c", "echo chaos-exec; exit 3"]),
        "exec-close" => {
            // A process that would outlive its session unless the agent ends it (docker
            // does not when its client goes): looked for in the containers at the end.
            let sleep = format!("77{step}");
            conn.open_exec(&id, &container, &["sleep", &sleep])
                .and_then(|()| {
                    std::thread::sleep(Duration::from_millis(1500));
                    conn.close_session(&id)
                })
        }
        "cp-down" => conn.open_cp(&id, &container, "/www/index.html", "down"),
        "cp-down-missing" => conn.open_cp(&id, &container, "/nonexistent", "down"),
        _ => conn.open_cp(&id, &container, "/tmp", "up").and_then(|()| {
            let tar = tar_of(
                &format!("chaos-{step}.txt"),
                b"uploaded by the chaos campaign\n",
            );
            conn.upload(&id, &tar)
        }),
    };
    if let Err(e) = sent {
        return Ok(format!("the connection ended while opening: {e}"));
    }
    let Some(o) = conn.outcome(&id, END_WITHIN) else {
        if conn.is_closed() {
            return Ok("the connection ended".into());
        }
        return Err(format!(
            "no exit or error frame within {}s",
            END_WITHIN.as_secs()
        ));
    };
    let end = o.end["type"].as_str().unwrap_or("?").to_string();
    let download = kind.starts_with("cp-down");
    if download && end == "exit" && !o.kinds.iter().any(|k| k == "cp_end") {
        return Err(format!(
            "a download ended with exit but no cp_end (frames {:?})",
            o.kinds
        ));
    }
    Ok(format!("ended with {end} after {} frames", o.kinds.len()))
}

/// A ustar archive of one regular file (what `muveectl cp` streams up).
fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let fields: [(usize, String); 5] = [
        (100, "0000644\0".into()),
        (108, "0000000\0".into()),
        (116, "0000000\0".into()),
        (124, format!("{:011o}\0", data.len())),
        (136, format!("{:011o}\0", 0)),
    ];
    for (at, f) in fields {
        h[at..at + f.len()].copy_from_slice(f.as_bytes());
    }
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// Processes an `exec-close` session left in our containers (looked for before the cleanup).
pub fn leftover_execs(w: &World) -> Vec<String> {
    let nodes = [w.bed.node_name(Role::Deploy)];
    let mut out = Vec::new();
    for c in crate::bed::our_containers(&nodes, &format!("muvee-chaos-{}", w.bed.run)) {
        let id = c.split(' ').next().unwrap_or("");
        let top = crate::bed::docker_out(&["top", id]);
        for l in top.lines().filter(|l| l.contains("sleep 77")) {
            out.push(format!(
                "container {c} still runs an exec'd process whose session was closed: {}",
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tar_of_one_file_is_what_tar_reads() {
        let t = super::tar_of("a.txt", b"hello\n");
        assert_eq!(t.len(), 512 + 512 + 1024);
        let sum: u32 = t[..512]
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*b)
                }
            })
            .sum();
        let stored = std::str::from_utf8(&t[148..154]).unwrap();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
    }
}
