//! Line numbers of YAML nodes by path (`policy.egress[1].ports`), so that a rule id and a
//! validation error lead back to a line. serde gives values without positions; a second pass
//! over the parser's events records where each node starts.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// A position in a file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

/// Path → where the node starts, one map per YAML document of a file.
#[derive(Debug, Default)]
pub(crate) struct Spans {
    docs: Vec<HashMap<String, At>>,
    /// Nodes that aliases stand for (each alias counted as the nodes of what it names).
    aliased: u64,
}

impl Spans {
    /// Indexes `text`. A text the parser rejects yields no spans: serde reports that error.
    pub(crate) fn index(text: &str) -> Self {
        let mut r = Recorder::default();
        let _ = Parser::new_from_str(text).load(&mut r, true);
        Spans {
            docs: r.docs,
            aliased: r.aliased,
        }
    }

    /// Nodes the file's aliases stand for once expanded, counted without expanding them.
    pub(crate) fn aliased_nodes(&self) -> u64 {
        self.aliased
    }

    /// Where the node at `path` starts in document `doc` (line and column), or the nearest
    /// enclosing node's position.
    pub(crate) fn at(&self, doc: usize, path: &str) -> Option<At> {
        let map = self.docs.get(doc)?;
        let mut p = path;
        loop {
            if let Some(l) = map.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map {
        key: Option<String>,
        expecting_key: bool,
        /// No key seen yet: the parser marks a block mapping's start after its first key, so
        /// the first key's position becomes the mapping's.
        first: bool,
    },
    Seq {
        next: usize,
    },
}

#[derive(Default)]
struct Recorder {
    docs: Vec<HashMap<String, At>>,
    stack: Vec<(Frame, String)>,
    /// Nodes so far, each alias counted as the nodes of what it names.
    expanded: u64,
    /// The part of `expanded` that aliases stand for.
    aliased: u64,
    /// Per anchor id, the nodes of the node it names (expanded).
    anchors: HashMap<usize, u64>,
    /// Per open collection: its anchor id (0 for none) and `expanded` at its start.
    open: Vec<(usize, u64)>,
}

impl Recorder {
    /// Called at the start of every node; returns the node's path, or `None` for a map key.
    fn node_start(&mut self, key_text: Option<&str>, line: At) -> Option<String> {
        let Some((frame, parent)) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match frame {
            Frame::Map {
                key,
                expecting_key,
                first,
            } => {
                if *expecting_key {
                    *expecting_key = false;
                    if std::mem::take(first)
                        && let Some(doc) = self.docs.last_mut()
                        && let Some(at) = doc.get_mut(parent.as_str())
                    {
                        *at = line;
                    }
                    let k = key_text.unwrap_or("?").to_string();
                    let path = if parent.is_empty() {
                        k.clone()
                    } else {
                        format!("{parent}.{k}")
                    };
                    if let Some(doc) = self.docs.last_mut() {
                        doc.entry(path).or_insert(line);
                    }
                    *key = Some(k);
                    None
                } else {
                    *expecting_key = true;
                    let k = key.take().unwrap_or_default();
                    Some(if parent.is_empty() {
                        k
                    } else {
                        format!("{parent}.{k}")
                    })
                }
            }
            Frame::Seq { next } => {
                let path = format!("{parent}[{next}]");
                *next += 1;
                Some(path)
            }
        }
    }

    /// Records where `path` starts unless known (a map's value is where its key is);
    /// whether this recorded it.
    fn record(&mut self, path: &str, line: At) -> bool {
        let Some(doc) = self.docs.last_mut() else {
            return false;
        };
        match doc.entry(path.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(line);
                true
            }
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = At {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::DocumentStart => {
                self.docs.push(HashMap::new());
                self.stack.clear();
            }
            Event::Scalar(text, _, anchor, _) => {
                self.expanded = self.expanded.saturating_add(1);
                if anchor != 0 {
                    self.anchors.insert(anchor, 1);
                }
                // A scalar value is located where it is written, not at its key: that is what
                // a problem with it points to.
                if let Some(path) = self.node_start(Some(&text), line)
                    && let Some(doc) = self.docs.last_mut()
                {
                    doc.insert(path, line);
                }
            }
            Event::Alias(anchor) => {
                let n = self.anchors.get(&anchor).copied().unwrap_or(1);
                self.expanded = self.expanded.saturating_add(n);
                self.aliased = self.aliased.saturating_add(n);
                if let Some(path) = self.node_start(None, line) {
                    self.record(&path, line);
                }
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                self.open.push((anchor, self.expanded));
                self.expanded = self.expanded.saturating_add(1);
                self.collection_start(matches!(ev, Event::MappingStart(..)), line);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                if let Some((anchor, start)) = self.open.pop()
                    && anchor != 0
                {
                    self.anchors.insert(anchor, self.expanded - start);
                }
            }
            _ => {}
        }
    }
}

impl Recorder {
    fn collection_start(&mut self, map: bool, line: At) {
        let path = self.node_start(None, line).unwrap_or_default();
        let fresh = self.record(&path, line);
        let frame = if map {
            Frame::Map {
                key: None,
                expecting_key: true,
                first: fresh,
            }
        } else {
            Frame::Seq { next: 0 }
        };
        self.stack.push((frame, path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_counted_as_what_they_expand_to() {
        let flat = Spans::index("a: [1, 2, 3]\nb: 4\n");
        assert_eq!(flat.aliased_nodes(), 0);
        // Each alias stands for the sequence and its three items.
        let aliased = Spans::index("a: &x [1, 2, 3]\nb: *x\nc: *x\n");
        assert_eq!(aliased.aliased_nodes(), 2 * 4);
        // An alias of a node that holds aliases stands for what they stand for too.
        let nested = Spans::index("a: &x [1, 2]\nb: &y [*x, *x]\nc: *y\n");
        assert_eq!(nested.aliased_nodes(), 2 * 3 + (1 + 2 * 3));
        // Each level repeats the one before twice: 2^40 nodes from a few lines.
        let mut laughs = String::from("l0: &l0 [x, x]\n");
        for i in 1..=40 {
            laughs.push_str(&format!("l{i}: &l{i} [*l{}, *l{}]\n", i - 1, i - 1));
        }
        assert!(Spans::index(&laughs).aliased_nodes() > 1 << 40);
    }

    #[test]
    fn paths_map_to_lines() {
        let text = "\
policy:
  name: a
  egress:
    - to: 10.0.0.0/8
      ports: [80, 443]
    - to:
        - 1.2.3.4
        - ::1
      protocol: udp
---
policy:
  name: b
";
        let s = Spans::index(text);
        assert_eq!(s.at(0, "policy").map(|a| a.line), Some(1));
        assert_eq!(s.at(0, "policy.name").map(|a| a.line), Some(2));
        assert_eq!(s.at(0, "policy.egress[0]").map(|a| a.line), Some(4));
        assert_eq!(
            s.at(0, "policy.egress[0].ports[1]").map(|a| a.line),
            Some(5)
        );
        assert_eq!(s.at(0, "policy.egress[1]").map(|a| a.line), Some(6));
        assert_eq!(s.at(0, "policy.egress[1].to[1]").map(|a| a.line), Some(8));
        assert_eq!(
            s.at(0, "policy.egress[1].protocol").map(|a| a.line),
            Some(9)
        );
        // Unknown paths fall back to the nearest enclosing node.
        assert_eq!(s.at(0, "policy.egress[1].nope").map(|a| a.line), Some(6));
        assert_eq!(s.at(1, "policy.name").map(|a| a.line), Some(12));
        assert_eq!(s.at(2, "policy").map(|a| a.line), None);
        assert_eq!(
            s.at(0, "policy.egress[0].ports[1]"),
            Some(At {
                line: 5,
                column: 19
            })
        );
        assert_eq!(
            s.at(0, "policy.egress[1].protocol"),
            Some(At {
                line: 9,
                column: 17
            })
        );
    }
}
