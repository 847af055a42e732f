//! The control channel's frames (protocol §1.10), and the queue sessions send theirs through
//! to the socket thread.

use crate::sys::wait;
use crate::task::clean_text;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;

/// Where sessions queue frames for the socket: a bounded queue, and the doorbell that
/// wakes the socket thread.
#[derive(Clone)]
pub struct Out {
    queue: Arc<wait::Mailbox<Frame>>,
    pub bell: Arc<wait::Doorbell>,
}

impl Out {
    pub fn new(queue: Arc<wait::Mailbox<Frame>>, bell: Arc<wait::Doorbell>) -> Out {
        Out { queue, bell }
    }

    /// Waits for room in the queue; Err when the connection is gone (the queue closed).
    pub fn send(&self, f: Frame) -> Result<(), Gone> {
        let r = self.queue.send(f).map_err(|_| Gone);
        self.bell.ring();
        r
    }
}

/// A frame that could not be read, of `session`: what its `error` says.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed {
    pub session: String,
    pub msg: String,
}

/// The connection a frame was for has ended.
#[derive(Debug)]
pub struct Gone;

/// One text frame (§1.10): every field but `type` is left out when empty, as Go's
/// `omitempty` does, so `code:0` never appears.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain_prefix: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stream: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(skip_serializing_if = "is_zero", deserialize_with = "saturated")]
    pub cols: u16,
    #[serde(skip_serializing_if = "is_zero", deserialize_with = "saturated")]
    pub rows: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sig: String,
    #[serde(skip_serializing_if = "is_zero_i")]
    pub code: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub direction: String,
}

/// A terminal size: any JSON number, held to 0..=65535 (a PTY cannot be larger).
fn saturated<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = serde_json::Value::deserialize(d)?
        .as_f64()
        .ok_or_else(|| D::Error::custom("a terminal size is a number"))?;
    Ok(n.clamp(0.0, f64::from(u16::MAX)) as u16)
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn is_zero_i(n: &i64) -> bool {
    *n == 0
}

impl Frame {
    pub fn new(kind: &str, session: &str) -> Frame {
        Frame {
            kind: kind.into(),
            session: session.into(),
            ..Frame::default()
        }
    }

    pub fn with_data(kind: &str, session: &str, bytes: &[u8]) -> Frame {
        Frame {
            data: BASE64.encode(bytes),
            ..Frame::new(kind, session)
        }
    }

    /// Text that may carry docker's output: made storable (no NUL or control characters).
    pub fn error(session: &str, msg: &str) -> Frame {
        Frame {
            msg: clean_text(msg).into_owned(),
            ..Frame::new("error", session)
        }
    }

    /// A text message from the control plane. Err: it is not a frame of ours, with the
    /// `error` to answer when it names a session (so the CLI waiting on it hears why).
    pub fn parse(text: &str) -> Result<Frame, Option<Malformed>> {
        serde_json::from_str(text).map_err(|e| {
            let v: serde_json::Value = serde_json::from_str(text).ok()?;
            let session = v.get("session")?.as_str().filter(|s| !s.is_empty())?;
            Some(Malformed {
                session: session.into(),
                msg: format!("malformed frame: {e}"),
            })
        })
    }

    pub fn bytes(&self) -> Vec<u8> {
        BASE64.decode(&self.data).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_out_empty_fields_as_go_does() {
        let exit = Frame::new("exit", "s1");
        assert_eq!(
            serde_json::to_string(&exit).unwrap(),
            r#"{"type":"exit","session":"s1"}"#
        );
        let f: Frame = serde_json::from_str(
            r#"{"type":"open_exec","session":"a","container":"muvee-x","cmd":["sh"],"cols":120,"rows":40,"extra":1}"#,
        )
        .unwrap();
        assert_eq!((f.cols, f.rows, f.cmd.len()), (120, 40, 1));
        let e = Frame {
            code: -1,
            ..Frame::new("exit", "a")
        };
        assert!(serde_json::to_string(&e).unwrap().contains(r#""code":-1"#));
        assert_eq!(Frame::error("a", "bad\0byte").msg, "bad\u{fffd}byte");
    }

    #[test]
    fn malformed_frames_answer_their_session_and_sizes_saturate() {
        let f = Frame::parse(
            r#"{"type":"open_exec","session":"m2","cmd":["sh"],"cols":70000,"rows":-3}"#,
        )
        .unwrap();
        assert_eq!((f.cols, f.rows), (u16::MAX, 0));
        let e = Frame::parse(r#"{"type":"open_exec","session":"m3","cmd":"sh"}"#).unwrap_err();
        let e = e.expect("an error for m3");
        assert_eq!(e.session, "m3");
        assert!(e.msg.starts_with("malformed frame: "), "{}", e.msg);
        let e = Frame::parse(r#"{"type":"resize","session":"m4","cols":"wide"}"#).unwrap_err();
        assert_eq!(e.map(|e| e.session), Some("m4".into()));
        // No session to answer: a number, missing, or not JSON at all.
        assert_eq!(
            Frame::parse(r#"{"type":"open_exec","session":7}"#),
            Err(None)
        );
        assert_eq!(Frame::parse(r#"{"type":7}"#), Err(None));
        assert_eq!(Frame::parse("not json"), Err(None));
    }
}
