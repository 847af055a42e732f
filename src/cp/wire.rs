//! The control plane's own records the client sends: the node it registers.

use serde::{Deserialize, Serialize};

pub const ZERO_UUID: &str = "00000000-0000-0000-0000-000000000000";
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

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

#[cfg(test)]
mod tests {
    use super::*;

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
