//! Task kinds and the roles that serve them. The wire name of each task type stands here
//! once for reading and once for writing; everything else (the loop's choice of tasks,
//! dispatch, log shipping, `--type`'s help) derives from these enums.

/// The two node roles, as `NODE_ROLE` and the control plane's poll name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Builder,
    Deploy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Builder => "builder",
            Role::Deploy => "deploy",
        }
    }

    /// Whether this role runs tasks of this kind.
    pub fn serves(self, kind: &Kind) -> bool {
        kind.role() == Some(self)
    }
}

/// How a deploy or cleanup is shaped: one container (no `mode`), today's compose and image
/// projects (`mode: "compose"`), or a mode this agent does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Container,
    Compose,
    Other(String),
}

impl Mode {
    fn parse(mode: &str) -> Mode {
        match mode {
            "" => Mode::Container,
            "compose" => Mode::Compose,
            other => Mode::Other(other.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Build,
    Deploy(Mode),
    Cleanup(Mode),
    RuntimeLogs,
    Restart,
    Env,
    Describe,
    Pause,
    Unpause,
    /// A type this agent does not run, with its name as sent ("" when absent).
    Unknown(String),
}

impl Kind {
    /// Every kind the agent runs, in the order `--type`'s help lists them.
    pub const KNOWN: [Kind; 9] = [
        Kind::Build,
        Kind::Deploy(Mode::Container),
        Kind::Cleanup(Mode::Container),
        Kind::RuntimeLogs,
        Kind::Restart,
        Kind::Env,
        Kind::Describe,
        Kind::Pause,
        Kind::Unpause,
    ];

    /// The kind of a task whose `Type` is `name`; `mode` is the payload's `mode` ("" when absent).
    pub fn parse(name: &str, mode: &str) -> Kind {
        match name {
            "build" => Kind::Build,
            "deploy" => Kind::Deploy(Mode::parse(mode)),
            "cleanup" => Kind::Cleanup(Mode::parse(mode)),
            "runtime_logs" => Kind::RuntimeLogs,
            "restart" => Kind::Restart,
            "env" => Kind::Env,
            "describe" => Kind::Describe,
            "pause" => Kind::Pause,
            "unpause" => Kind::Unpause,
            other => Kind::Unknown(other.to_string()),
        }
    }

    /// The wire name.
    pub fn name(&self) -> &str {
        match self {
            Kind::Build => "build",
            Kind::Deploy(_) => "deploy",
            Kind::Cleanup(_) => "cleanup",
            Kind::RuntimeLogs => "runtime_logs",
            Kind::Restart => "restart",
            Kind::Env => "env",
            Kind::Describe => "describe",
            Kind::Pause => "pause",
            Kind::Unpause => "unpause",
            Kind::Unknown(name) => name,
        }
    }

    /// The role that serves this kind; None for a type no role runs.
    pub fn role(&self) -> Option<Role> {
        match self {
            Kind::Build => Some(Role::Builder),
            Kind::Unknown(_) => None,
            _ => Some(Role::Deploy),
        }
    }

    /// Builds and deploys write a deployment log; inspections and lifecycle tasks do not.
    pub fn ships_logs(&self) -> bool {
        matches!(self, Kind::Build | Kind::Deploy(_))
    }

    /// The names of every kind the agent runs, for help and error texts.
    pub fn known_names() -> String {
        let names: Vec<&str> = Kind::KNOWN.iter().map(Kind::name).collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_kind_reads_back_from_its_name_and_has_one_role() {
        for k in Kind::KNOWN {
            assert_eq!(Kind::parse(k.name(), ""), k);
            let serving = [Role::Builder, Role::Deploy].map(|r| r.serves(&k));
            assert_eq!(serving.iter().filter(|s| **s).count(), 1, "{k:?}");
        }
        assert_eq!(
            Kind::parse("deploy", "compose"),
            Kind::Deploy(Mode::Compose)
        );
        assert_eq!(
            Kind::parse("cleanup", "swarm"),
            Kind::Cleanup(Mode::Other("swarm".into()))
        );
        let unknown = Kind::parse("reboot", "");
        assert_eq!((unknown.name(), unknown.role()), ("reboot", None));
        assert!(Role::Builder.serves(&Kind::Build) && !Role::Builder.serves(&Kind::Env));
        assert!(Kind::Build.ships_logs() && !Kind::Restart.ships_logs());
    }
}
