//! What the compose CLI reads of the host itself, before the engine sees anything: env files
//! (into the app's environment), `extends` and `include` files, secret and config files (v1
//! bind-mounts them), label files. The CLI runs as the agent, often root, and the engine
//! never sees those paths, so they are judged here, from the raw files, before the first
//! compose call (even `compose config` reads them, and its errors quote them): each must lie
//! inside the project's own dir once symlinks are resolved, without a variable the CLI would
//! fill from its own environment or a `~`. The compose files named this way (`extends`,
//! `include`) are judged the same, transitively. Seccomp profiles (which the CLI inlines as
//! JSON) are refused unread: only docker's default is allowed.

use crate::work::policy::{resolve, Violation};
use crate::work::yaml::{self, Yaml};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// A compose file larger than this is not one (the inline YAML's limit).
const MAX_FILE: u64 = 1 << 20;
/// Files an `extends`/`include` chain may name.
const MAX_FILES: usize = 32;

/// Why the files could not be judged; what the report says.
#[derive(Debug)]
pub struct Unreadable(pub String);

/// The violations of compose file `file` (inside `root`, the project's own dir) and of the
/// compose files it names.
pub fn judge(root: &Path, file: &Path) -> Result<Vec<Violation>, Unreadable> {
    let root =
        std::fs::canonicalize(root).map_err(|e| Unreadable(format!("{}: {e}", root.display())))?;
    let mut w = Walk {
        root,
        seen: Vec::new(),
        out: Vec::new(),
    };
    let first = resolve(&w.root.join(file));
    w.file(&first)?;
    Ok(w.out)
}

struct Walk {
    root: PathBuf,
    seen: Vec<PathBuf>,
    out: Vec<Violation>,
}

impl Walk {
    /// Judges one compose file, at a path already found inside the root.
    fn file(&mut self, path: &Path) -> Result<(), Unreadable> {
        if self.seen.iter().any(|p| p == path) {
            return Ok(());
        }
        if self.seen.len() >= MAX_FILES {
            return Err(Unreadable(format!(
                "`extends` and `include` name more than {MAX_FILES} files"
            )));
        }
        self.seen.push(path.to_path_buf());
        let shown = path.strip_prefix(&self.root).unwrap_or(path).display();
        let bad = |why: String| Unreadable(format!("cannot read compose file {shown}: {why}"));
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_FILE {
            return Err(bad(format!("larger than {MAX_FILE} bytes")));
        }
        let doc = yaml::load(&text).map_err(|e| bad(e.0))?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        for (name, s) in services(&doc) {
            for (key, v) in yaml::entries(s) {
                self.service_key(name, key, v, &dir)?;
            }
        }
        for kind in ["secrets", "configs"] {
            self.files_of(&doc, kind, &dir);
        }
        self.include(&doc, &dir)
    }

    /// Where `p` (as the file in `dir` names it) may land, or why it may not be read.
    /// Relative paths are judged from the file's dir and from the project's dir (the CLIs
    /// differ, and v1 takes the project's for the first file only).
    fn place(&self, dir: &Path, p: &str) -> Result<Vec<PathBuf>, String> {
        if p.contains('$') {
            return Err(format!(
                "names {p:?}, which the compose CLI would fill from its own environment"
            ));
        }
        let outside = || Err(format!("reads host file {p}, outside the project's files"));
        if p.starts_with('~') {
            return outside();
        }
        let mut at = Vec::new();
        for base in [dir, &self.root] {
            let r = resolve(&base.join(p));
            if r.components().any(|c| c == Component::ParentDir) || !r.starts_with(&self.root) {
                return outside();
            }
            at.push(r);
        }
        Ok(at)
    }

    /// Judges the compose files at `candidates` that exist (compose fails on a missing one).
    fn files(&mut self, candidates: Vec<PathBuf>) -> Result<(), Unreadable> {
        for f in candidates.iter().filter(|f| f.is_file()) {
            self.file(f)?;
        }
        Ok(())
    }

    fn service_key(
        &mut self,
        service: &str,
        key: &str,
        v: &Yaml,
        dir: &Path,
    ) -> Result<(), Unreadable> {
        let (key, paths): (&'static str, Vec<&str>) = match key {
            "env_file" => ("env_file", yaml::strings(v, "path")),
            "label_file" => ("label_file", yaml::strings(v, "")),
            "extends" => ("extends", file(v)),
            "credential_spec" => ("credential_spec", file(v)),
            // Any profile but docker's default is refused: not even read (v1 opens it
            // relative to its working dir).
            "security_opt" => {
                for p in yaml::strings(v, "").into_iter().filter_map(seccomp_file) {
                    let what =
                        format!("sets seccomp profile {p}; only docker's default is allowed");
                    self.add(service, "security_opt", what);
                }
                return Ok(());
            }
            // compose v2 runs a provider's plugin binary on the host.
            "provider" => {
                self.add(service, "provider", "runs a plugin on the host".into());
                return Ok(());
            }
            _ => return Ok(()),
        };
        for p in paths {
            match self.place(dir, p) {
                Err(what) => self.add(service, key, what),
                Ok(at) if key == "extends" => self.files(at)?,
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Top-level `secrets:` or `configs:` whose `file` is outside the project, named under
    /// each service that uses them; v2's `environment:` ones read the CLI's environment.
    fn files_of(&mut self, doc: &Yaml, kind: &'static str, dir: &Path) {
        for (name, def) in yaml::entries(yaml::get(doc, kind).unwrap_or(&Yaml::Null)) {
            let what = if let Some(var) = yaml::get(def, "environment") {
                let var = var.as_str().unwrap_or("");
                Some(format!(
                    "reads the compose CLI's environment variable {var:?}"
                ))
            } else {
                let file = yaml::get(def, "file").and_then(Yaml::as_str);
                file.and_then(|f| self.place(dir, f).err())
            };
            let Some(what) = what else { continue };
            let mut users: Vec<&str> = services(doc)
                .into_iter()
                .filter(|(_, s)| {
                    let list = yaml::entries(s).into_iter().filter(|(k, _)| *k == kind);
                    list.flat_map(|(_, v)| yaml::strings(v, "source"))
                        .any(|n| n == name)
                })
                .map(|(n, _)| n)
                .collect();
            if users.is_empty() {
                users.push("");
            }
            for u in users {
                self.add(u, kind, format!("{name} {what}"));
            }
        }
    }

    /// v2's top-level `include:` (paths, or `{path, env_file, project_directory}`).
    fn include(&mut self, doc: &Yaml, dir: &Path) -> Result<(), Unreadable> {
        let list = match yaml::get(doc, "include") {
            Some(Yaml::Array(l)) => l.iter().collect(),
            Some(one) => vec![one],
            None => vec![],
        };
        for e in list {
            if yaml::get(e, "project_directory").is_some() {
                self.add(
                    "",
                    "include",
                    "sets `project_directory`, which the policy does not follow".into(),
                );
            }
            let files = match e.as_str() {
                Some(p) => vec![p],
                None => yaml::get(e, "path").map_or(vec![], |p| yaml::strings(p, "")),
            };
            let envs = yaml::get(e, "env_file").map_or(vec![], |p| yaml::strings(p, ""));
            for (p, compose) in files
                .iter()
                .map(|p| (p, true))
                .chain(envs.iter().map(|p| (p, false)))
            {
                match self.place(dir, p) {
                    Err(what) => self.add("", "include", what),
                    Ok(at) if compose => self.files(at)?,
                    Ok(_) => {}
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, service: &str, key: &'static str, what: String) {
        self.out.push(Violation {
            service: service.into(),
            key,
            what,
        });
    }
}

/// `v.file`, as a list.
fn file(v: &Yaml) -> Vec<&str> {
    yaml::get(v, "file")
        .and_then(Yaml::as_str)
        .into_iter()
        .collect()
}

/// A file's services: under `services:`, or every top-level key in v1's version 1 format.
fn services(doc: &Yaml) -> Vec<(&str, &Yaml)> {
    yaml::entries(yaml::get(doc, "services").unwrap_or(doc))
}

/// The profile file of a `security_opt` entry `seccomp=FILE` (or `seccomp:FILE`).
fn seccomp_file(o: &str) -> Option<&str> {
    match o.split_once(['=', ':'])? {
        ("seccomp", "unconfined" | "builtin") => None,
        ("seccomp", file) => Some(file),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("muvee-reads-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("deploy")).unwrap();
        for (path, text) in files {
            std::fs::write(dir.join(path), text).unwrap();
        }
        dir
    }

    fn texts(root: &Path, file: &str) -> Vec<String> {
        let v = judge(root, Path::new(file)).unwrap();
        v.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn every_file_the_cli_reads_must_be_the_projects_own() {
        let compose = "x-base: &base\n  env_file: /etc/shadow\nservices:\n  app:\n    <<: *base\n    image: i\n    env_file: [app.env, ./deploy/../app.env, {path: ~/.docker/config.json}, \"${HOME}/x\", link/shadow, ../outside.env]\n    extends: {file: deploy/base.yml, service: b}\n    security_opt: [\"seccomp=deploy/profile.json\", \"seccomp:/tmp/allow.json\", seccomp=unconfined, no-new-privileges]\n    secrets: [s, {source: t}]\n  side:\n    image: i\n    extends: {file: /etc/passwd, service: b}\n    label_file: /etc/hostname\n    provider: {type: x}\nsecrets:\n  s: {file: /etc/muvee/agent.env}\n  t: {environment: AGENT_SECRET}\n  u: {file: app.env}\nconfigs:\n  c: {file: /etc/hosts}\ninclude:\n  - deploy/inc.yml\n  - {path: /etc/compose.yml, project_directory: ..}\n";
        let base = "services:\n  b:\n    env_file: ../../etc/group\n    extends: {file: ./base.yml, service: b}\n";
        let inc = "services:\n  i:\n    env_file: /root/.env\n";
        let root = project(
            "all",
            &[
                ("docker-compose.yml", compose),
                ("app.env", "A=1\n"),
                ("deploy/base.yml", base),
                ("deploy/inc.yml", inc),
            ],
        );
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let outside = |p: &str| format!("reads host file {p}, outside the project's files");
        assert_eq!(
            texts(&root, "docker-compose.yml"),
            [
                format!("service app: `env_file` {}", outside("/etc/shadow")),
                format!("service app: `env_file` {}", outside("~/.docker/config.json")),
                "service app: `env_file` names \"${HOME}/x\", which the compose CLI would fill from its own environment".into(),
                format!("service app: `env_file` {}", outside("link/shadow")),
                format!("service app: `env_file` {}", outside("../outside.env")),
                format!("service b: `env_file` {}", outside("../../etc/group")),
                "service app: `security_opt` sets seccomp profile deploy/profile.json; only docker's default is allowed".into(),
                "service app: `security_opt` sets seccomp profile /tmp/allow.json; only docker's default is allowed".into(),
                format!("service side: `extends` {}", outside("/etc/passwd")),
                format!("service side: `label_file` {}", outside("/etc/hostname")),
                "service side: `provider` runs a plugin on the host".into(),
                format!("service app: `secrets` s {}", outside("/etc/muvee/agent.env")),
                "service app: `secrets` t reads the compose CLI's environment variable \"AGENT_SECRET\"".into(),
                format!("top-level `configs` c {}", outside("/etc/hosts")),
                format!("service i: `env_file` {}", outside("/root/.env")),
                "top-level `include` sets `project_directory`, which the policy does not follow".into(),
                format!("top-level `include` {}", outside("/etc/compose.yml")),
            ]
        );
        // v1's version 1 format: services at the top.
        let root = project(
            "v1",
            &[("c.yml", "app:\n  image: i\n  env_file: /etc/shadow\n")],
        );
        assert_eq!(
            texts(&root, "c.yml"),
            [format!(
                "service app: `env_file` {}",
                outside("/etc/shadow")
            )]
        );
        let root = project("bad", &[("c.yml", "a: [\n")]);
        let e = judge(&root, Path::new("c.yml")).unwrap_err().0;
        assert!(e.starts_with("cannot read compose file c.yml: "), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
