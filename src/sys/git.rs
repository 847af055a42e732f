//! The git CLI calls: a shallow clone, and the fetch/checkout of the builder's git cache.
//! Credentials reach git only through its environment (an `http.extraHeader` via
//! GIT_CONFIG_*, an ssh command naming a key file), never argv or a config file.

use crate::sys::executor::{Cmd, ExecError, Limits, Runner};
use std::path::Path;

pub struct Git<'a> {
    runner: &'a dyn Runner,
    env: Vec<(String, String)>,
    /// Settings for every call, passed as GIT_CONFIG_KEY_n/VALUE_n (never written to disk).
    config: Vec<(String, String)>,
}

impl<'a> Git<'a> {
    pub fn new(runner: &'a dyn Runner) -> Git<'a> {
        let env = [
            ("GIT_TERMINAL_PROMPT", "0"),
            ("GIT_ASKPASS", ""),
            // Transport helpers such as ext:: would run arbitrary commands.
            ("GIT_ALLOW_PROTOCOL", "https:http:ssh:git:file"),
        ];
        Git {
            runner,
            env: env.map(|(k, v)| (k.into(), v.into())).to_vec(),
            config: Vec::new(),
        }
    }

    /// A setting for every call of this Git (`-c` without argv).
    pub fn config(mut self, key: &str, value: &str) -> Git<'a> {
        self.config.push((key.into(), value.into()));
        self
    }

    /// An HTTP header for every request, e.g. `Authorization: Basic …`.
    pub fn header(self, header: &str) -> Git<'a> {
        self.config("http.extraHeader", header)
    }

    /// The command git runs for ssh transports (GIT_SSH_COMMAND).
    pub fn ssh_command(mut self, command: String) -> Git<'a> {
        self.env.push(("GIT_SSH_COMMAND".into(), command));
        self
    }

    fn cmd(&self) -> Cmd {
        let mut c = Cmd::new("git");
        c.env.clone_from(&self.env);
        if !self.config.is_empty() {
            c = c.env("GIT_CONFIG_COUNT", self.config.len().to_string());
            for (i, (k, v)) in self.config.iter().enumerate() {
                c = c
                    .env(format!("GIT_CONFIG_KEY_{i}"), k)
                    .env(format!("GIT_CONFIG_VALUE_{i}"), v);
            }
        }
        c
    }

    /// A call on the repository whose work tree is `dir`, and on no other: git never walks
    /// up to an enclosing repository, even when `dir/.git` is broken (it refuses instead).
    fn in_repo(&self, dir: &Path) -> Cmd {
        // Relative to `dir`, where -C puts git before it reads them.
        let c = self.cmd().env("GIT_DIR", ".git").env("GIT_WORK_TREE", ".");
        c.arg("-C").arg(dir)
    }

    /// `git clone --depth=1 [--branch B] -- URL DEST`; an empty branch is the default one.
    pub fn clone_shallow(
        &self,
        url: &str,
        branch: &str,
        dest: &Path,
        limits: Limits,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ExecError> {
        let mut c = self.cmd().args(["clone", "--depth=1"]);
        if !branch.is_empty() {
            c = c.args(["--branch", branch]);
        }
        let c = c
            .arg("--")
            .arg(url)
            .arg(dest)
            .limits(limits)
            .label("git clone");
        self.runner.run(&c, &mut |_, l| on_line(l)).map(drop)
    }

    /// `git init -q DIR` with `origin` set to `url` (which holds no credentials).
    pub fn init(&self, dir: &Path, url: &str, limits: Limits) -> Result<(), ExecError> {
        let c = self.cmd().args(["init", "-q"]).arg(dir).limits(limits);
        self.runner.output(&c)?;
        let c = self
            .in_repo(dir)
            .args(["config", "remote.origin.url", url])
            .limits(limits)
            .label("git config");
        self.runner.output(&c).map(drop)
    }

    /// The remote's default branch (`git ls-remote --symref URL HEAD`); None when its HEAD
    /// is detached (or names a branch we would not pass on).
    pub fn default_branch(&self, url: &str, limits: Limits) -> Result<Option<String>, ExecError> {
        let c = self
            .cmd()
            .args(["ls-remote", "--symref", "--", url, "HEAD"])
            .limits(limits)
            .label("git ls-remote");
        let out = self.runner.output(&c)?.stdout;
        Ok(out.lines().find_map(|l| {
            let (target, name) = l.strip_prefix("ref: ")?.split_once('\t')?;
            let branch = target.strip_prefix("refs/heads/")?;
            (name == "HEAD" && valid_ref_name(branch)).then(|| branch.to_string())
        }))
    }

    /// `git -C REPO fetch -q --depth=1 --no-tags --prune -- URL +refs/heads/B:refs/remotes/origin/B`:
    /// only the objects REPO lacks travel (its commits are the negotiation's haves).
    pub fn fetch_branch(
        &self,
        repo: &Path,
        url: &str,
        branch: &str,
        limits: Limits,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ExecError> {
        let c = self
            .in_repo(repo)
            .args([
                "fetch",
                "-q",
                "--depth=1",
                "--no-tags",
                "--prune",
                "--",
                url,
            ])
            .arg(format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"))
            .limits(limits)
            .label("git fetch");
        self.runner.run(&c, &mut |_, l| on_line(l)).map(drop)
    }

    /// `git -C REPO checkout -q -f --no-track -B B refs/remotes/origin/B`: the work tree and
    /// branch B become exactly the fetched commit (files git tracks; it rewrites only what
    /// changed). No tracking section: the config names no branch.
    pub fn checkout_fetched(
        &self,
        repo: &Path,
        branch: &str,
        limits: Limits,
    ) -> Result<(), ExecError> {
        let c = self
            .in_repo(repo)
            .args(["checkout", "-q", "-f", "--no-track", "-B", branch])
            .arg(format!("refs/remotes/origin/{branch}"))
            .limits(limits)
            .label("git checkout");
        self.runner.output(&c).map(drop)
    }

    /// `git -C REPO update-index -q --refresh`: records unchanged files as clean.
    pub fn refresh_index(&self, repo: &Path, limits: Limits) -> Result<(), ExecError> {
        let c = self
            .in_repo(repo)
            .args(["update-index", "-q", "--refresh"])
            .limits(limits)
            .label("git update-index");
        self.runner.output(&c).map(drop)
    }

    /// The full commit id of HEAD in `dir`.
    pub fn head(&self, dir: &Path, limits: Limits) -> Result<String, ExecError> {
        let c = self
            .in_repo(dir)
            .args(["rev-parse", "HEAD"])
            .limits(limits)
            .label("git rev-parse");
        Ok(self.runner.output(&c)?.stdout.trim().to_string())
    }
}

/// `git check-ref-format` rules, plus: must not start with '-'.
pub fn valid_ref_name(b: &str) -> bool {
    b.len() <= 255
        && !b.starts_with('-')
        && !b.starts_with('/')
        && !b.ends_with('/')
        && !b.ends_with('.')
        && b != "@"
        && !b.contains("..")
        && !b.contains("@{")
        && !b.contains("//")
        && !b
            .chars()
            .any(|c| c.is_control() || c == ' ' || "~^:?*[\\".contains(c))
        && b.split('/')
            .all(|c| !c.starts_with('.') && !c.ends_with(".lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for ok in ["main", "feature/x-1", "v1.2.3", "release_2026"] {
            assert!(valid_ref_name(ok), "{ok}");
        }
        for bad in [
            "-b", "a..b", "a b", "a:b", "x.lock", ".hidden", "a/", "/a", "a//b", "@", "a@{1}",
            "a~1", "a^", "a\\b", "a.",
        ] {
            assert!(!valid_ref_name(bad), "{bad}");
        }
    }
}
