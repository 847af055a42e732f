//! Deploy role: runs an app image as `muvee-<domain_prefix>` and reports its host port.

use crate::executor::{self, Cmd};
use crate::tasks::Ctx;
use crate::wire::Payload;
use std::time::Duration;

/// Short docker calls (ps, inspect, rm, port) must never hang a task.
pub const DOCKER_SHORT: Duration = Duration::from_secs(60);

/// `domain_prefix` becomes a container name and a Traefik host: it must be a DNS label.
pub fn domain_prefix<'a>(p: &Payload<'a>) -> Result<&'a str, String> {
    let v = p.required("domain_prefix")?;
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if !ok {
        return Err(format!(
            "payload field `domain_prefix`: {v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
        ));
    }
    Ok(v)
}

pub fn deploy(_ctx: &Ctx) -> Result<u16, String> {
    Err("deploy is not implemented yet".into())
}

/// Removes `muvee-<prefix>`; a container that does not exist is success.
pub fn remove_app(ctx: &Ctx, prefix: &str) -> Result<(), String> {
    let name = format!("muvee-{prefix}");
    rm_container(ctx, &name)
}

fn rm_container(ctx: &Ctx, name: &str) -> Result<(), String> {
    let cmd = Cmd::new(&ctx.cfg.docker_cli)
        .args(["rm", "-f", "--", name])
        .timeout(DOCKER_SHORT, "docker call timeout");
    match executor::output(&cmd) {
        Ok(_) => Ok(()),
        Err(e)
            if e.output()
                .is_some_and(|o| o.tail.iter().any(|l| l.contains("No such container"))) =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
