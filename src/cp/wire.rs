//! Wire types, byte-compatible with the muvee control plane (March 2026 and today).
//! Tasks arrive with Go field names (`ID`, `Payload`); completion bodies are maps that Go
//! would emit with sorted keys, which struct field order reproduces here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Task, deployment and project IDs become file names: allow only what a UUID (or a test's ID) contains.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One task from `GET /api/agent/tasks`. `PayloadJSON` (a second copy of every secret) is
/// deliberately not deserialized.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Task {
    #[serde(rename = "ID", alias = "id")]
    pub id: String,
    #[serde(
        rename = "Type",
        alias = "type",
        default,
        deserialize_with = "null_default"
    )]
    pub kind: String,
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

fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The `store.Node` shape the Go agent registers with; keys in Go's declaration order.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    pub role: String,
    pub host_ip: String,
    pub max_storage_bytes: u64,
    pub used_storage_bytes: u64,
    pub last_seen_at: String,
    pub created_at: String,
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
    pub status: String,
}

impl Completion {
    pub fn running() -> Completion {
        Completion {
            status: "running".into(),
            ..Completion::default()
        }
    }
    pub fn completed() -> Completion {
        Completion {
            status: "completed".into(),
            ..Completion::default()
        }
    }
    /// A completed report carrying text (an inspection task's output), sanitised like a
    /// failure reason.
    pub fn completed_with(text: impl AsRef<str>) -> Completion {
        Completion {
            status: "completed".into(),
            result: Some(clean_text(text.as_ref()).into_owned()),
            ..Completion::default()
        }
    }
    pub fn failed(reason: impl AsRef<str>) -> Completion {
        Completion {
            status: "failed".into(),
            result: Some(clean_text(reason.as_ref()).into_owned()),
            ..Completion::default()
        }
    }
    pub fn is_final(&self) -> bool {
        self.status != "running"
    }
}

/// Text the control plane stores: today's server keeps results and log lines in Postgres
/// text columns, which refuse NUL (the request then fails with 500 for ever). NUL and the
/// other control characters except tab and newline become U+FFFD.
pub fn clean_text(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !s.contains(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| if bad(c) { '\u{fffd}' } else { c })
            .collect(),
    )
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings; serde_json
/// does not. JSON text (outside strings) never holds these characters, so replacing them
/// everywhere in serde_json's output gives the bytes Go would produce.
pub fn go_escape(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A payload value that cannot be used; the message names the field and what was wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Typed access to a free-form payload (no map: a null payload, every field absent).
/// Items of an array know their place, so errors name `datasets[0].version`.
pub struct Payload<'a> {
    map: Option<&'a Map<String, Value>>,
    path: String,
}

impl<'a> Payload<'a> {
    pub fn of(v: &'a Value) -> Result<Payload<'a>, Invalid> {
        match v {
            Value::Object(m) => Ok(Payload::at(Some(m), String::new())),
            Value::Null => Ok(Payload::at(None, String::new())),
            other => Err(Invalid(format!(
                "payload: expected a JSON object, got {}",
                kind(other)
            ))),
        }
    }

    fn at(map: Option<&'a Map<String, Value>>, path: String) -> Payload<'a> {
        Payload { map, path }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map?.get(key).filter(|v| !v.is_null())
    }

    /// The field's full name: `key`, or `list[i].key` inside an array item.
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An optional string; absent or null → "".
    pub fn str(&self, key: &str) -> Result<&'a str, Invalid> {
        let name = self.field(key);
        match self.get(key) {
            None => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(Invalid(format!(
                "payload field `{name}`: expected a string, got {}",
                kind(v)
            ))),
        }
    }

    pub fn required(&self, key: &str) -> Result<&'a str, Invalid> {
        let name = self.field(key);
        let s = self.str(key)?;
        if s.trim().is_empty() {
            return Err(Invalid(format!("payload field `{name}` is required")));
        }
        Ok(s)
    }

    /// A non-negative integer; Go may send it as a float (8080.0).
    pub fn uint(&self, key: &str) -> Result<Option<u64>, Invalid> {
        let name = self.field(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(u) = n.as_u64() {
                    return Ok(Some(u));
                }
                match n.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(Some(f as u64)),
                    _ => Err(Invalid(format!(
                        "payload field `{name}`: expected a non-negative whole number, got {n}"
                    ))),
                }
            }
            Some(v) => Err(Invalid(format!(
                "payload field `{name}`: expected a number, got {}",
                kind(v)
            ))),
        }
    }

    /// An object of string values (env_vars, build_secrets); absent or null → empty.
    pub fn string_map(&self, key: &str) -> Result<Vec<(String, String)>, Invalid> {
        let name = self.field(key);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(Invalid(format!(
                        "payload field `{name}.{k}`: expected a string, got {}",
                        kind(other)
                    ))),
                })
                .collect(),
            Some(v) => Err(Invalid(format!(
                "payload field `{name}`: expected an object, got {}",
                kind(v)
            ))),
        }
    }

    /// An array of objects; absent or null → empty.
    pub fn objects(&self, key: &str) -> Result<Vec<Payload<'a>>, Invalid> {
        let name = self.field(key);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(Payload::at(Some(m), format!("{name}[{i}]"))),
                    Value::Null => Ok(Payload::at(None, format!("{name}[{i}]"))),
                    _ => Err(Invalid(format!(
                        "payload field `{name}[{i}]`: expected an object, got {}",
                        kind(v)
                    ))),
                })
                .collect(),
            Some(v) => Err(Invalid(format!(
                "payload field `{name}`: expected an array, got {}",
                kind(v)
            ))),
        }
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_cased_task_and_ignores_payload_json() {
        let raw = r#"{"ID":"9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10","Type":"deploy","NodeID":null,"DeploymentID":"c0ffee00-1234-4abc-9def-000000000001","Payload":{"container_port":8080.0,"datasets":null,"env_vars":{"A":"b"}},"PayloadJSON":"{\"x\": 1}","Status":"pending","Result":"","CreatedAt":"2026-11-02T08:16:01.402113Z","UpdatedAt":"2026-11-02T08:16:01.402113Z"}"#;
        let t: Task = serde_json::from_str(raw).unwrap();
        assert_eq!(t.kind, "deploy");
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
        assert_eq!((t.kind.as_str(), t.deployment_id.as_str()), ("", ""));
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
    fn text_for_the_control_plane_has_no_nul_or_control_characters() {
        assert_eq!(
            clean_text("a\0b\x1b[31mc\rd\te\nf\u{85}"),
            "a\u{fffd}b\u{fffd}[31mc\u{fffd}d\te\nf\u{fffd}"
        );
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

    #[test]
    fn register_body_has_go_node_shape() {
        let n = Node {
            id: ZERO_UUID.into(),
            hostname: "h".into(),
            role: "deploy".into(),
            host_ip: "172.18.0.1".into(),
            max_storage_bytes: 107374182400,
            used_storage_bytes: 0,
            last_seen_at: ZERO_TIME.into(),
            created_at: ZERO_TIME.into(),
        };
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"id":"00000000-0000-0000-0000-000000000000","hostname":"h","role":"deploy","host_ip":"172.18.0.1","max_storage_bytes":107374182400,"used_storage_bytes":0,"last_seen_at":"0001-01-01T00:00:00Z","created_at":"0001-01-01T00:00:00Z"}"#
        );
    }
}
