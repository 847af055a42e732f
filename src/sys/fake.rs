//! A scripted [`Runner`] for unit tests: records every command's argv and answers from
//! rules, so the roles' decisions (what runs next after a failure) are tested without
//! Docker, git or rsync.

use crate::sys::executor::{Cmd, ExecError, Output, Runner, Stream};
use std::sync::{Arc, Mutex};

type Effect = dyn Fn(&Cmd) -> Result<String, ExecError> + Send + Sync;

/// What a matched command does.
#[derive(Clone)]
pub enum Reply {
    /// Exit 0 printing these stdout lines.
    Ok(String),
    /// Exit `code` with this message on stderr.
    Fail(i32, String),
    /// Killed by our own cancel.
    Canceled,
    /// Runs a closure (e.g. creates the files a clone would) and answers with its result.
    With(Arc<Effect>),
}

struct Rule {
    prefix: String,
    reply: Reply,
    once: bool,
}

#[derive(Default)]
pub struct Fake {
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<String>>,
}

impl Fake {
    pub fn new() -> Arc<Fake> {
        Arc::new(Fake::default())
    }

    /// Every command whose argv (program base name first) starts with `prefix` gets
    /// `reply`; the newest matching rule wins. Unmatched commands exit 0 silently.
    pub fn on(&self, prefix: &str, reply: Reply) {
        self.add(prefix, reply, false);
    }

    /// Like [`Fake::on`], for the next matching call only.
    pub fn once(&self, prefix: &str, reply: Reply) {
        self.add(prefix, reply, true);
    }

    fn add(&self, prefix: &str, reply: Reply, once: bool) {
        let rule = Rule {
            prefix: prefix.into(),
            reply,
            once,
        };
        self.rules.lock().unwrap().push(rule);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// The recorded calls that start with `prefix`.
    pub fn ran(&self, prefix: &str) -> Vec<String> {
        let calls = self.calls();
        calls
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }

    fn reply_for(&self, argv: &str) -> Reply {
        let mut rules = self.rules.lock().unwrap();
        let Some(i) = rules.iter().rposition(|r| argv.starts_with(&r.prefix)) else {
            return Reply::Ok(String::new());
        };
        let reply = rules[i].reply.clone();
        if rules[i].once {
            rules.remove(i);
        }
        reply
    }
}

pub fn argv(cmd: &Cmd) -> String {
    let prog = cmd.program.rsplit('/').next().unwrap_or(&cmd.program);
    let mut s = prog.to_string();
    for a in &cmd.args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

impl Runner for Fake {
    fn run(&self, cmd: &Cmd, on_line: &mut dyn FnMut(Stream, &str)) -> Result<Output, ExecError> {
        let argv = argv(cmd);
        self.calls.lock().unwrap().push(argv.clone());
        let result = match self.reply_for(&argv) {
            Reply::Ok(out) => Ok(out),
            Reply::With(f) => f(cmd),
            Reply::Canceled => Err(ExecError::Canceled),
            Reply::Fail(code, msg) => Err(ExecError::Exit {
                name: cmd.name(),
                code,
                output: Output {
                    stdout: String::new(),
                    tail: vec![msg],
                },
            }),
        };
        let stdout = result?;
        for line in stdout.lines() {
            on_line(Stream::Stdout, line);
        }
        Ok(Output {
            tail: stdout.lines().map(String::from).collect(),
            stdout,
        })
    }
}

/// A fresh directory for one unit test (removed by the test, or by the next run).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("muvee-agent-unit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
