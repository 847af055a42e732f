//! The body of `POST /api/deployments/{id}/logs`: how many whole lines fit one request.
//! Shared by the task's log shipper and the late-log queue.

/// The largest request body, serialized: nginx's default `client_max_body_size 1m`.
pub const BODY_MAX: usize = 1 << 20;
/// `{"line":""}` around the text.
const BODY_OVERHEAD: usize = 11;
/// A line longer than this is shipped in pieces, so one line always fits a body (escaped,
/// a byte takes at most 6).
pub const LINE_MAX: usize = 64 * 1024;

/// Lines (ends of line) in `text`.
pub fn lines_in(text: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', text).count() as u64
}

/// Bytes `text` takes inside a JSON string as serde_json writes it.
fn json_len(text: &[u8]) -> usize {
    if !text.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        return text.len();
    }
    let cost = |b: &u8| match b {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0..=0x1f => 6,
        _ => 1,
    };
    text.iter().map(cost).sum()
}

/// The length of the longest run of whole lines (each ending in '\n') of `text` whose request
/// body fits BODY_MAX; at least the first line.
pub fn fit(text: &[u8]) -> usize {
    let (mut body, mut cut) = (BODY_OVERHEAD, 0);
    for nl in memchr::memchr_iter(b'\n', text) {
        // Joined by an escaped '\n'; the last one is not sent.
        body += json_len(&text[cut..nl]) + if cut > 0 { 2 } else { 0 };
        if body > BODY_MAX && cut > 0 {
            break;
        }
        cut = nl + 1;
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_line_fits_one_body_whatever_it_holds() {
        assert!(json_len("\x01".repeat(LINE_MAX).as_bytes()) + BODY_OVERHEAD <= BODY_MAX);
        let two = format!(
            "{}\n{}\n",
            "a".repeat(BODY_MAX / 2),
            "b".repeat(BODY_MAX / 2)
        );
        assert_eq!(fit(two.as_bytes()), BODY_MAX / 2 + 1, "only the first fits");
    }
}
