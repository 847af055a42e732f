//! The git CLI calls of the builder: a shallow clone and reading HEAD. Credentials reach git
//! only through its environment (an `http.extraHeader` via GIT_CONFIG_*, an ssh command
//! naming a key file), never argv.

use crate::sys::executor::{Cmd, ExecError, Limits, Runner};
use std::path::Path;

pub struct Git<'a> {
    runner: &'a dyn Runner,
    env: Vec<(String, String)>,
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
        }
    }

    /// An HTTP header for every request, e.g. `Authorization: Basic …`.
    pub fn header(mut self, header: &str) -> Git<'a> {
        for (k, v) in [
            ("GIT_CONFIG_COUNT", "1"),
            ("GIT_CONFIG_KEY_0", "http.extraHeader"),
            ("GIT_CONFIG_VALUE_0", header),
        ] {
            self.env.push((k.into(), v.into()));
        }
        self
    }

    /// The command git runs for ssh transports (GIT_SSH_COMMAND).
    pub fn ssh_command(mut self, command: String) -> Git<'a> {
        self.env.push(("GIT_SSH_COMMAND".into(), command));
        self
    }

    fn cmd(&self) -> Cmd {
        let mut c = Cmd::new("git");
        c.env.clone_from(&self.env);
        c
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

    /// The full commit id of HEAD in `dir`.
    pub fn head(&self, dir: &Path, limits: Limits) -> Result<String, ExecError> {
        let c = self
            .cmd()
            .arg("-C")
            .arg(dir)
            .args(["rev-parse", "HEAD"])
            .limits(limits)
            .label("git rev-parse");
        Ok(self.runner.output(&c)?.stdout.trim().to_string())
    }
}
