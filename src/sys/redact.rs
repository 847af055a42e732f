//! Process-wide secret redaction. Every secret the agent learns (agent secret, registry
//! password, git tokens, SSH key lines, build secrets, env values) is registered here once,
//! and every line the agent logs, captures or ships passes through [`scrub`].
//! The set only grows: a value seen once stays masked for the life of the process.

use std::borrow::Cow;
use std::sync::RwLock;

const MASK: &str = "***";
/// Hard cap so a long-lived agent with thousands of deploys cannot grow without bound.
const MAX_SECRETS: usize = 10_000;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret. Explicit credentials are masked from 4 characters up; multi-line
/// values (SSH keys) are also registered line by line, since output is scrubbed per line.
pub fn add(secret: &str) {
    add_min(secret, 4)
}

/// Registers a value that is secret but may be short and common (env values): only values
/// of 6 characters or more are masked, so "8080" or "true" do not blank unrelated output.
pub fn add_weak(value: &str) {
    add_min(value, 6)
}

fn add_min(secret: &str, min: usize) {
    let mut parts: Vec<&str> = vec![secret.trim_end_matches(['\r', '\n'])];
    if secret.contains('\n') {
        parts.extend(secret.lines().map(str::trim));
    }
    let mut set = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for p in parts {
        if p.chars().count() < min || set.iter().any(|s| s == p) {
            continue;
        }
        if set.len() >= MAX_SECRETS {
            set.remove(0);
        }
        set.push(p.to_string());
        // Longest first, so a secret that contains another is masked whole.
        set.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Masks every registered secret and the userinfo of any URL (`scheme://user:pass@host`).
pub fn scrub(line: &str) -> Cow<'_, str> {
    let set = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out: Cow<str> = Cow::Borrowed(line);
    for s in set.iter() {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), MASK));
        }
    }
    match mask_userinfo(&out) {
        Some(masked) => Cow::Owned(masked),
        None => out,
    }
}

/// `https://user:tok@host/x` → `https://***@host/x`; None when nothing needs masking.
fn mask_userinfo(s: &str) -> Option<String> {
    if !s.contains("://") {
        return None;
    }
    let mut out = String::new();
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) if at > 0 && tail[..at] != *MASK => {
                out.push_str(MASK);
                out.push_str(&tail[at..end]);
                changed = true;
            }
            _ => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_values_and_url_userinfo() {
        add("tok-3f9a1c");
        add_weak("8080");
        add("-----BEGIN KEY-----\nAAAAB3NzaC1yc2EAAAADAQAB\n-----END KEY-----\n");
        assert_eq!(scrub("auth tok-3f9a1c ok"), "auth *** ok");
        assert_eq!(scrub("port 8080"), "port 8080");
        assert_eq!(scrub("key AAAAB3NzaC1yc2EAAAADAQAB!"), "key ***!");
        assert_eq!(
            scrub("fatal: unable to access 'https://bob:pw@git.example/x.git/': 403"),
            "fatal: unable to access 'https://***@git.example/x.git/': 403"
        );
        assert_eq!(
            scrub("ssh://git@host/x and http://h/a@b"),
            "ssh://***@host/x and http://h/a@b"
        );
        assert_eq!(scrub("plain line"), "plain line");
    }
}
