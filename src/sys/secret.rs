//! A credential held in memory: the agent secret and the registry password. Its `Debug`
//! prints `***` and it has no `Display`, so a `{:?}` of a config or a `{}` in a message cannot
//! leak it; the value is read only through [`Secret::expose`], where it is sent or used.

use serde::Deserialize;

#[derive(Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value itself, for the one place that sends or uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// For tests and checks that compare with a literal (`assert_eq!(cfg.agent_secret, "")`).
impl PartialEq<&str> for Secret {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-7c1d");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "hunter2-7c1d");
        let parsed: Secret = serde_json::from_str(r#""pw-1""#).unwrap();
        assert_eq!(parsed, "pw-1");
    }
}
