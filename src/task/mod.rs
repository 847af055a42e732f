//! The task model: what a task is (its kind, the role that serves it, its payload), what it
//! needs from the control plane's config, and how it ends (a completion with a status). Both
//! the protocol client (`cp`) and the task work (`work`) build on it; it knows neither.
//! Serde shapes are byte-compatible with the muvee control plane (March 2026 and today):
//! tasks arrive with Go field names (`ID`, `Payload`); completion bodies are maps that Go
//! would emit with sorted keys, which struct field order reproduces here.

mod kind;
mod payload;
mod text;

pub use kind::{Kind, Mode, Role};
pub use payload::{valid_id, Invalid, Payload};
pub use text::{clean_text, go_escape};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One task from `GET /api/agent/tasks`. `PayloadJSON` (a second copy of every secret) is
/// deliberately not deserialized.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Task {
    #[serde(rename = "ID", alias = "id")]
    pub id: String,
    /// The wire name of the task type; [`Task::kind`] is its typed form.
    #[serde(
        rename = "Type",
        alias = "type",
        default,
        deserialize_with = "null_default"
    )]
    pub type_name: String,
    #[serde(
        rename = "DeploymentID",
        alias = "deployment_id",
        default,
        deserialize_with = "null_default"
    )]
    pub deployment_id: String,
    #[serde(rename = "Payload", alias = "payload", default)]
    pub payload: Value,
}

impl Task {
    /// The typed kind; deploy and cleanup carry the payload's `mode`.
    pub fn kind(&self) -> Kind {
        let mode = self.payload.get("mode").and_then(|m| m.as_str());
        Kind::parse(&self.type_name, mode.unwrap_or(""))
    }
}

pub(crate) fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `GET /api/agent/config`. Every key may be absent or empty.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AgentConfig {
    #[serde(deserialize_with = "null_default")]
    pub base_domain: String,
    #[serde(deserialize_with = "null_default")]
    pub dataset_nfs_base_path: String,
    #[serde(deserialize_with = "null_default")]
    pub registry_addr: String,
    #[serde(deserialize_with = "null_default")]
    pub registry_password: String,
    #[serde(deserialize_with = "null_default")]
    pub registry_user: String,
    #[serde(deserialize_with = "null_default")]
    pub volume_nfs_base_path: String,
}

/// Body of `POST /api/agent/tasks/{id}/complete`, keys sorted as Go's map encoding sorts them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Completion {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub image_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<String>,
    pub status: Status,
}

/// How far a task got, as the control plane's `status` field says it.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Running,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Completion {
    pub fn running() -> Completion {
        Completion {
            status: Status::Running,
            ..Completion::default()
        }
    }
    pub fn completed() -> Completion {
        Completion {
            status: Status::Completed,
            ..Completion::default()
        }
    }
    /// A completed report carrying text (an inspection task's output), sanitised like a
    /// failure reason.
    pub fn completed_with(text: impl AsRef<str>) -> Completion {
        Completion {
            status: Status::Completed,
            result: Some(clean_text(text.as_ref()).into_owned()),
            ..Completion::default()
        }
    }
    pub fn failed(reason: impl AsRef<str>) -> Completion {
        Completion {
            status: Status::Failed,
            result: Some(clean_text(reason.as_ref()).into_owned()),
            ..Completion::default()
        }
    }
    pub fn is_final(&self) -> bool {
        self.status != Status::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_cased_task_and_ignores_payload_json() {
        let raw = r#"{"ID":"9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10","Type":"deploy","NodeID":null,"DeploymentID":"c0ffee00-1234-4abc-9def-000000000001","Payload":{"container_port":8080.0,"datasets":null,"env_vars":{"A":"b"}},"PayloadJSON":"{\"x\": 1}","Status":"pending","Result":"","CreatedAt":"2026-11-02T08:16:01.402113Z","UpdatedAt":"2026-11-02T08:16:01.402113Z"}"#;
        let t: Task = serde_json::from_str(raw).unwrap();
        assert_eq!(t.kind(), Kind::Deploy(Mode::Container));
        assert_eq!(t.deployment_id, "c0ffee00-1234-4abc-9def-000000000001");
        let p = Payload::of(&t.payload).unwrap();
        assert_eq!(p.uint("container_port").unwrap(), Some(8080));
        assert!(p.objects("datasets").unwrap().is_empty());
        assert_eq!(
            p.string_map("env_vars").unwrap(),
            vec![("A".into(), "b".into())]
        );
        assert_eq!(p.str("missing").unwrap(), "");
        let t: Task =
            serde_json::from_str(r#"{"ID":"x","Type":null,"DeploymentID":null,"Payload":null}"#)
                .unwrap();
        assert_eq!((t.type_name.as_str(), t.deployment_id.as_str()), ("", ""));
    }

    #[test]
    fn payload_errors_name_the_field() {
        let v: Value = serde_json::json!({"container_port": "80", "env_vars": {"A": 1}, "n": -1.5});
        let p = Payload::of(&v).unwrap();
        assert_eq!(
            p.uint("container_port").unwrap_err().to_string(),
            "payload field `container_port`: expected a number, got string \"80\""
        );
        assert_eq!(
            p.string_map("env_vars").unwrap_err().to_string(),
            "payload field `env_vars.A`: expected a string, got number 1"
        );
        assert!(p.uint("n").unwrap_err().to_string().contains("`n`"));
        assert_eq!(
            p.required("image_tag").unwrap_err().to_string(),
            "payload field `image_tag` is required"
        );
    }

    #[test]
    fn completion_bodies_match_go_byte_for_byte() {
        let s = |c: &Completion| serde_json::to_string(c).unwrap();
        assert_eq!(s(&Completion::running()), r#"{"status":"running"}"#);
        let mut c = Completion::completed();
        c.host_port = Some(32768);
        assert_eq!(s(&c), r#"{"host_port":32768,"status":"completed"}"#);
        let mut c = Completion::completed();
        c.image_tag = Some("r/p:1a2b".into());
        assert_eq!(s(&c), r#"{"image_tag":"r/p:1a2b","status":"completed"}"#);
        assert_eq!(
            s(&Completion::failed("x")),
            r#"{"result":"x","status":"failed"}"#
        );
        assert_eq!(
            s(&Completion::completed_with("{\"PORT\":\"8080\"}\u{0}")),
            "{\"result\":\"{\\\"PORT\\\":\\\"8080\\\"}\u{fffd}\",\"status\":\"completed\"}"
        );
    }

    #[test]
    fn go_escape_matches_encoding_json() {
        let v = serde_json::json!({"a": "<b>&c\u{2028}"});
        assert_eq!(
            go_escape(&v.to_string()),
            r#"{"a":"\u003cb\u003e\u0026c\u2028"}"#
        );
    }

    #[test]
    fn text_for_the_control_plane_changes_only_nul() {
        assert_eq!(
            clean_text("a\0b\x1b[31mc\rd\te\nf\u{85}\x7f"),
            "a\u{fffd}b\x1b[31mc\rd\te\nf\u{85}\x7f"
        );
        assert!(matches!(
            clean_text("progress\r\x1b[2K50%"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(
            clean_text("plain\ttext\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        let c = Completion::failed("exit 1: \0\0");
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            "{\"result\":\"exit 1: \u{fffd}\u{fffd}\",\"status\":\"failed\"}"
        );
    }

    #[test]
    fn task_ids_are_checked_before_becoming_paths() {
        assert!(valid_id("9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10"));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id(""));
    }
}
