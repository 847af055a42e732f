//! Text as the control plane stores it and JSON as Go encodes it.

/// Text the control plane stores: today's server keeps results and log lines in Postgres
/// text columns, which refuse NUL (the request then fails with 500 for ever) and nothing
/// else. NUL becomes U+FFFD; `\r`, escapes and every other character pass as they are, as
/// the Go agent sends them (invalid UTF-8 was already decoded to U+FFFD).
pub fn clean_text(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('\0') {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.replace('\0', "\u{fffd}"))
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
