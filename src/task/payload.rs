//! Typed access to a task's free-form payload: every error names the field and the value.

use serde_json::{Map, Value};

/// Task, deployment and project IDs become file names: allow only what a UUID (or a test's ID) contains.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
