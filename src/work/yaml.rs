//! Compose files as YAML (yaml-rust2). A first pass over the parser's events bounds what
//! aliases expand to and how deep the document nests, so no file (the inline YAML is up to
//! 1 MiB) can exhaust the agent's memory or its stack before the tree is built.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};
pub use yaml_rust2::Yaml;
use yaml_rust2::YamlLoader;

/// Nodes a document may expand to, each alias counted as a copy of what it names.
const MAX_NODES: u64 = 1 << 20;
/// Nesting no compose file needs.
const MAX_DEPTH: u64 = 64;

/// Why a text is not YAML we read.
#[derive(Debug)]
pub struct YamlError(pub String);

/// The first document of `text` (Null when there is none).
pub fn load(text: &str) -> Result<Yaml, YamlError> {
    let mut size = Size::default();
    let err = |e: yaml_rust2::ScanError| YamlError(e.to_string());
    // Event by event: the parser's own `load` recurses once per level.
    let mut parser = Parser::new_from_str(text);
    while !size.over {
        match parser.next_token().map_err(err)? {
            (Event::StreamEnd, _) => break,
            (ev, _) => size.event(ev),
        }
    }
    if size.over {
        return Err(YamlError(format!(
            "it nests deeper than {MAX_DEPTH} levels or its aliases expand to more than {MAX_NODES} nodes"
        )));
    }
    let docs = YamlLoader::load_from_str(text).map_err(err)?;
    Ok(docs.into_iter().next().unwrap_or(Yaml::Null))
}

/// What the loader would build, counted without building it: (nodes, depth) per anchor and
/// per open collection.
#[derive(Default)]
struct Size {
    anchors: HashMap<usize, (u64, u64)>,
    /// Open collections: anchor, nodes, depth of their deepest child.
    open: Vec<(usize, u64, u64)>,
    over: bool,
}

impl Size {
    fn event(&mut self, ev: Event) {
        let (anchor, nodes, depth) = match ev {
            Event::SequenceStart(a, _) | Event::MappingStart(a, _) => {
                self.open.push((a, 1, 0));
                self.over |= self.open.len() as u64 > MAX_DEPTH;
                return;
            }
            Event::SequenceEnd | Event::MappingEnd => match self.open.pop() {
                Some((a, n, d)) => (a, n, d + 1),
                None => return,
            },
            Event::Scalar(_, _, a, _) => (a, 1, 1),
            Event::Alias(id) => {
                let (n, d) = self.anchors.get(&id).copied().unwrap_or((1, 1));
                (0, n, d)
            }
            _ => return,
        };
        if anchor > 0 {
            self.anchors.insert(anchor, (nodes, depth));
        }
        let below = self.open.len() as u64;
        if let Some((_, n, d)) = self.open.last_mut() {
            *n = n.saturating_add(nodes);
            *d = (*d).max(depth);
        }
        self.over |= nodes > MAX_NODES || below + depth > MAX_DEPTH;
        self.over |= self.open.last().is_some_and(|o| o.1 > MAX_NODES);
    }
}

/// `m[key]` of a mapping.
pub fn get<'a>(m: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    m.as_hash()?.get(&Yaml::String(key.into()))
}

/// The entries of a mapping with string keys; `<<` merge keys are followed (what they merge
/// is listed too, before the mapping's own keys override it).
pub fn entries(m: &Yaml) -> Vec<(&str, &Yaml)> {
    let mut out = Vec::new();
    for (k, v) in m.as_hash().into_iter().flatten() {
        match k.as_str() {
            Some("<<") => match v {
                Yaml::Array(list) => list.iter().for_each(|m| out.extend(entries(m))),
                m => out.extend(entries(m)),
            },
            Some(k) => out.push((k, v)),
            None => {}
        }
    }
    out
}

/// A string or a list of strings (`env_file: a.env` or `env_file: [a.env]`); long-syntax
/// list entries give their `key` (`{path: a.env}`).
pub fn strings<'a>(v: &'a Yaml, key: &str) -> Vec<&'a str> {
    match v {
        Yaml::Array(list) => list
            .iter()
            .filter_map(|e| e.as_str().or_else(|| get(e, key).and_then(Yaml::as_str)))
            .collect(),
        v => v.as_str().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_merges_and_bombs() {
        let doc =
            load("x: &b\n  env_file: [a.env, {path: b.env}]\ns:\n  <<: *b\n  image: i\n").unwrap();
        let s = get(&doc, "s").unwrap();
        let keys: Vec<&str> = entries(s).iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["env_file", "image"]);
        assert_eq!(strings(entries(s)[0].1, "path"), ["a.env", "b.env"]);
        // A billion laughs, nine levels deep: refused before anything is built.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 9].join(", ")));
        }
        assert!(load(&bomb).unwrap_err().0.contains("aliases expand"));
        let deep = "- ".repeat(100_000) + "x\n";
        assert!(load(&deep).unwrap_err().0.contains("nests deeper"));
        assert!(load("a: 1\na: 2\n").is_err(), "duplicate keys");
    }
}
