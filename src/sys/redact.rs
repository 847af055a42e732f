//! Process-wide secret redaction. Every secret the agent learns is registered here, and
//! every line the agent logs, captures or ships passes through [`scrub`]. The agent's own
//! credentials (agent secret, registry password) stay registered for the life of the
//! process; a task's secrets (git tokens, SSH keys, build secrets, env values) belong to
//! the task's [`Scope`] and are released when it ends, so no cap ever has to drop a secret
//! that is still in use, however many values one payload carries.

use memchr::memmem;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};

const MASK: &str = "***";

/// Every registered value, longest first (so a secret that contains another is masked
/// whole), with how many registrations hold it.
static SECRETS: RwLock<BTreeMap<(Reverse<usize>, String), usize>> = RwLock::new(BTreeMap::new());

/// What [`may_need_scrub`] searches for, rebuilt after the set changes.
static PREFILTER: RwLock<Option<Arc<Prefilter>>> = RwLock::new(None);

/// A quick "can a secret occur in these bytes" test over a whole chunk of output, so the
/// common case (no secret anywhere) costs a few SIMD scans instead of a search per line
/// and secret.
enum Prefilter {
    /// Few secrets: search each.
    Each(Vec<memmem::Finder<'static>>),
    /// Many (a payload with thousands of env values): look up every 4-byte window.
    Windows(HashSet<[u8; 4]>),
}

/// Above this many secrets one pass over the windows beats a search per secret.
const EACH_MAX: usize = 32;

fn prefilter() -> Arc<Prefilter> {
    if let Some(p) = &*PREFILTER.read().unwrap_or_else(|e| e.into_inner()) {
        return p.clone();
    }
    let set = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let p = if set.len() <= EACH_MAX {
        Prefilter::Each(
            set.keys()
                .map(|(_, s)| memmem::Finder::new(s.as_bytes()).into_owned())
                .collect(),
        )
    } else {
        let window = |s: &String| s.as_bytes().get(..4).and_then(|w| w.try_into().ok());
        Prefilter::Windows(set.keys().filter_map(|(_, s)| window(s)).collect())
    };
    let p = Arc::new(p);
    *PREFILTER.write().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
    p
}

fn changed() {
    *PREFILTER.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// False when no registered secret and no URL userinfo can occur in `bytes`: then every
/// line in them is already clean. True means "scrub each line".
pub fn may_need_scrub(bytes: &[u8]) -> bool {
    if memmem::find(bytes, b"://").is_some() {
        return true;
    }
    match &*prefilter() {
        Prefilter::Each(finders) => finders.iter().any(|f| f.find(bytes).is_some()),
        Prefilter::Windows(set) => bytes.windows(4).any(|w| set.contains(w)),
    }
}

fn parts(secret: &str, min: usize) -> Vec<String> {
    // Multi-line values (SSH keys) also line by line: output is scrubbed per line.
    let mut parts: Vec<&str> = vec![secret.trim_end_matches(['\r', '\n'])];
    if secret.contains('\n') {
        parts.extend(secret.lines().map(str::trim));
    }
    let mut out: Vec<String> = parts
        .into_iter()
        .filter(|p| p.chars().count() >= min)
        .map(String::from)
        .collect();
    out.dedup();
    out
}

fn hold(values: &[String]) {
    let mut set = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for v in values {
        *set.entry((Reverse(v.len()), v.clone())).or_default() += 1;
    }
    drop(set);
    changed();
}

fn release(values: &[String]) {
    let mut set = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for v in values {
        let key = (Reverse(v.len()), v.clone());
        if let Some(n) = set.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                set.remove(&key);
            }
        }
    }
    drop(set);
    changed();
}

/// Registers one of the agent's own credentials for the life of the process (masked from
/// 4 characters up). Registering the same value again costs nothing.
pub fn add(secret: &str) {
    let mut set = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for v in parts(secret, 4) {
        // Held for ever: a count no release can bring to zero.
        *set.entry((Reverse(v.len()), v)).or_default() = usize::MAX / 2;
    }
    drop(set);
    changed();
}

/// A task's secrets, masked while the task runs and released when it is dropped.
#[derive(Default)]
pub struct Scope {
    held: std::sync::Mutex<Vec<String>>,
}

impl Scope {
    pub fn new() -> Scope {
        Scope::default()
    }

    /// An explicit credential (token, key, build secret): masked from 4 characters up.
    pub fn add(&self, secret: &str) {
        self.hold(parts(secret, 4));
    }

    /// A value that is secret but may be short and common (env values): only values of 6
    /// characters or more are masked, so "8080" or "true" do not blank unrelated output.
    pub fn add_weak(&self, value: &str) {
        self.hold(parts(value, 6));
    }

    fn hold(&self, values: Vec<String>) {
        hold(&values);
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(values);
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        release(&self.held.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Masks every registered secret and the userinfo of any URL (`scheme://user:pass@host`).
pub fn scrub(line: &str) -> Cow<'_, str> {
    let set = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out: Cow<str> = Cow::Borrowed(line);
    for (_, s) in set.keys() {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), MASK));
        }
    }
    match mask_userinfo(&out) {
        Some(masked) => Cow::Owned(masked),
        None => out,
    }
}

/// How far back a cut looks for a URL whose user info it would split.
const URL_SPAN: usize = 2048;
/// How far a cut may move back from where it was due, and in how many steps: output that
/// holds a secret or a URL every few bytes must not hold the whole line back.
const CUT_BACK: usize = 4096;
const CUT_STEPS: usize = 8;

/// Where a line too long to keep whole is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub at: usize,
    /// There was no clean place near: bytes `[mask.0, at)` and `[at, mask.1)` hold what the
    /// cut splits (a secret, URL user info) and must be masked on both sides.
    pub mask: Option<(usize, usize)>,
}

/// Where a line too long to keep whole may be cut, at or before `at`, so that no registered
/// secret and no URL user info is split in two: each piece is scrubbed on its own, and the
/// two halves of a token match nothing. `bytes` is the line from its start; what follows
/// `at` is look-ahead, and a secret that may run on past its end counts as split. The cut
/// moves back at most CUT_BACK bytes in CUT_STEPS steps; when no clean place is that near,
/// it stays at `at` and says what to mask.
pub fn safe_cut(bytes: &[u8], at: usize) -> Cut {
    let set = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let at = at.min(bytes.len());
    let floor = at.saturating_sub(CUT_BACK);
    let mut cut = at;
    for _ in 0..CUT_STEPS {
        match split_by(bytes, cut, set.keys().map(|(_, s)| s.as_bytes())) {
            None => {
                return Cut {
                    at: cut,
                    mask: None,
                }
            }
            Some((lo, _)) if lo == 0 || lo < floor => break,
            Some((lo, _)) => cut = lo,
        }
    }
    let mask = split_by(bytes, at, set.keys().map(|(_, s)| s.as_bytes()));
    Cut { at, mask }
}

/// The span (start, end) of everything a cut at `cut` would split: `://`, URL authorities
/// and `secrets`; None when nothing is.
fn split_by<'a>(
    bytes: &[u8],
    cut: usize,
    secrets: impl Iterator<Item = &'a [u8]>,
) -> Option<(usize, usize)> {
    let mut span: Option<(usize, usize)> = None;
    let mut add = |start: usize, end: usize| {
        let (lo, hi) = span.unwrap_or((start, end));
        span = Some((lo.min(start), hi.max(end).min(bytes.len())));
    };
    if let Some(i) = spanning(bytes, cut, b"://") {
        add(i, i + 3);
    }
    if let Some(p) = url_spanning(bytes, cut) {
        let end = bytes[cut..].iter().position(authority_ends);
        add(p, end.map_or(bytes.len(), |e| cut + e));
    }
    for s in secrets {
        if let Some(i) = spanning(bytes, cut, s) {
            add(i, i + s.len());
        }
    }
    span
}

/// The start of an occurrence of `pat` that `cut` would split, or that may (it runs on past
/// the end of `bytes`).
fn spanning(bytes: &[u8], cut: usize, pat: &[u8]) -> Option<usize> {
    let first = *pat.first()?;
    let lo = cut.saturating_sub(pat.len() - 1);
    memchr::memchr_iter(first, &bytes[lo..cut])
        .map(|i| lo + i)
        .find(|&i| pat.starts_with(&bytes[i..bytes.len().min(i + pat.len())]))
}

/// The start of a `://` whose authority (user info included) `cut` would split.
fn url_spanning(bytes: &[u8], cut: usize) -> Option<usize> {
    let lo = cut.saturating_sub(URL_SPAN);
    let p = lo + memmem::rfind(&bytes[lo..cut], b"://")?;
    (!bytes[p + 3..cut].iter().any(authority_ends)).then_some(p)
}

/// What ends a URL's authority (user info included), as [`mask_userinfo`] sees it.
fn authority_ends(b: &u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'/' | b'"' | b'\'')
}

/// `https://user:tok@host/x` → `https://***@host/x`; None when nothing needs masking.
fn mask_userinfo(s: &str) -> Option<String> {
    if !s.contains("://") {
        return None;
    }
    let mut out = String::new();
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) if at > 0 && tail[..at] != *MASK => {
                out.push_str(MASK);
                out.push_str(&tail[at..end]);
                changed = true;
            }
            _ => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_values_and_url_userinfo() {
        add("tok-3f9a1c");
        let task = Scope::new();
        task.add_weak("8080");
        task.add("-----BEGIN KEY-----\nAAAAB3NzaC1yc2EAAAADAQAB\n-----END KEY-----\n");
        assert_eq!(scrub("auth tok-3f9a1c ok"), "auth *** ok");
        assert_eq!(scrub("port 8080"), "port 8080");
        assert_eq!(scrub("key AAAAB3NzaC1yc2EAAAADAQAB!"), "key ***!");
        assert_eq!(
            scrub("fatal: unable to access 'https://bob:pw@git.example/x.git/': 403"),
            "fatal: unable to access 'https://***@git.example/x.git/': 403"
        );
        assert_eq!(
            scrub("ssh://git@host/x and http://h/a@b"),
            "ssh://***@host/x and http://h/a@b"
        );
        assert_eq!(scrub("plain line"), "plain line");
    }

    #[test]
    fn a_cut_never_splits_a_secret_or_url_user_info() {
        let task = Scope::new();
        task.add("tok-9c2e77aa51");
        let line = format!("{}tok-9c2e77aa51 tail", " ".repeat(100));
        let clean = |at| Cut { at, mask: None };
        // Inside the token: the cut goes before it.
        assert_eq!(safe_cut(line.as_bytes(), 105), clean(100));
        // A prefix of the token at the end may continue: before it too.
        assert_eq!(safe_cut(&line.as_bytes()[..106], 106), clean(100));
        assert_eq!(safe_cut(line.as_bytes(), 114), clean(114));
        assert_eq!(safe_cut(line.as_bytes(), 50), clean(50));
        // Starting the line: no place before it, the token is masked on both sides.
        let forced = Cut {
            at: 5,
            mask: Some((0, 14)),
        };
        assert_eq!(safe_cut(b"tok-9c2e77aa51", 5), forced);
        let url = format!("{}https://bob:pw@git.example/x", "x".repeat(50));
        assert_eq!(safe_cut(url.as_bytes(), 62), clean(55));
        assert_eq!(safe_cut(url.as_bytes(), 56), clean(55));
        assert_eq!(safe_cut(url.as_bytes(), 75), clean(55));
        assert_eq!(safe_cut(url.as_bytes(), 77), clean(77));
    }

    #[test]
    fn a_cut_among_urls_everywhere_stays_near_and_masks_what_it_splits() {
        let task = Scope::new();
        task.add("tok-4d5e6f7a8b");
        // A `://` every 16 bytes: no clean place near, the cut stays where it was due.
        let chain = "a://bbbbbbbbbbbb".repeat(1 << 16);
        let t0 = std::time::Instant::now();
        for at in (1..64).map(|i| i << 14) {
            let cut = safe_cut(chain.as_bytes(), at);
            let (lo, hi) = cut.mask.expect("a mask");
            assert_eq!(cut.at, at);
            assert!(at - lo <= 16 && hi - at <= 16, "{cut:?}");
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        // A token across such a cut lies within the mask.
        let line = format!("{}tok-4d5e6f7a8b@host/x", &chain[..1 << 14]);
        let cut = safe_cut(line.as_bytes(), (1 << 14) + 5);
        let (lo, hi) = cut.mask.expect("a mask");
        assert!(lo <= 1 << 14 && hi >= (1 << 14) + 14, "{cut:?}");
    }

    #[test]
    fn a_task_scope_holds_any_number_of_values_and_releases_them() {
        add("agent-secret-5b7e");
        let task = Scope::new();
        task.add_weak("db-password-91c2e4");
        for i in 0..20_000 {
            task.add_weak(&format!("env-value-{i:06}"));
        }
        let other = Scope::new();
        other.add("shared-value-3d3d");
        task.add("shared-value-3d3d");
        let line = "agent-secret-5b7e db-password-91c2e4 env-value-019999 shared-value-3d3d";
        assert_eq!(scrub(line), "*** *** *** ***");
        drop(task);
        // The other task still uses its value; the agent's own secret is for ever.
        assert_eq!(scrub(line), "*** db-password-91c2e4 env-value-019999 ***");
        drop(other);
        assert_eq!(
            scrub("shared-value-3d3d agent-secret-5b7e"),
            "shared-value-3d3d ***"
        );
    }
}
