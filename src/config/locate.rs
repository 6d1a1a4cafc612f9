//! Where each field of the config stands in the text, so that errors found after parsing
//! (validation works on typed values that no longer know their position) can name a line.
//!
//! Built from yaml-rust2's event stream, which carries a position for every node in block and
//! flow style alike. serde_yaml cannot give these: it only locates its own errors.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, ScanError};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl From<Marker> for Position {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 but columns from 0.
        Position {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// A mapping key given twice in the same mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    /// Path of the repeated key, e.g. `upstreams.app`.
    pub path: String,
    /// Where it is repeated.
    pub at: Position,
    /// Where it was first given.
    pub first: Position,
}

/// Field path -> position of its value (of its key, when the value is a mapping or sequence),
/// position of its key, and the text of scalar values.
#[derive(Debug, Default)]
pub(crate) struct Locations {
    positions: HashMap<String, Position>,
    keys: HashMap<String, Position>,
    scalars: HashMap<String, String>,
    duplicates: Vec<Duplicate>,
}

impl Locations {
    /// The position of exactly `path`, if it is in the text.
    pub(crate) fn get(&self, path: &str) -> Option<Position> {
        self.positions.get(path).copied()
    }

    /// The position of the mapping key that names `path` (`defaults.timout` -> `timout`), if
    /// `path` is a mapping entry in the text. A key given twice: the last one.
    pub(crate) fn key(&self, path: &str) -> Option<Position> {
        self.keys.get(path).copied()
    }

    /// The text of the scalar at `path` as written, quotes and escapes resolved (`~`, `0x10`,
    /// `1.50`, and `""` for an empty value), if `path` is a scalar in the text.
    pub(crate) fn scalar(&self, path: &str) -> Option<&str> {
        self.scalars.get(path).map(String::as_str)
    }

    /// The position of `path` or, when it is absent (a missing field), of its nearest ancestor
    /// other than the document itself: "line 1" would point at nothing in particular.
    pub(crate) fn nearest(&self, path: &str) -> Option<Position> {
        let mut p = path;
        while !p.is_empty() {
            if let Some(pos) = self.get(p) {
                return Some(pos);
            }
            p = parent(p);
        }
        None
    }

    /// Mapping keys given more than once. serde keeps the last silently for maps (two
    /// upstreams both called `app`), so these are reported as errors by the caller.
    pub(crate) fn duplicates(&self) -> &[Duplicate] {
        &self.duplicates
    }
}

/// `routes[0].match.host` -> `routes[0].match` -> `routes[0]` -> `routes` -> ``.
fn parent(path: &str) -> &str {
    if path.ends_with(']') {
        if let Some(i) = path.rfind('[') {
            return &path[..i];
        }
    }
    match path.rfind('.') {
        Some(i) => &path[..i],
        None => "",
    }
}

/// Indexes the positions of every field path in `text`. Text that yaml-rust2 cannot parse gets
/// an empty index: serde_yaml reports the syntax error itself.
pub(crate) fn index(text: &str) -> Locations {
    let mut walker = Walker {
        parser: Parser::new_from_str(text),
        out: Locations::default(),
    };
    match walker.stream() {
        Ok(()) => walker.out,
        Err(_) => Locations::default(),
    }
}

/// Nesting deeper than this is not a config file; stop rather than risk the stack.
const MAX_DEPTH: usize = 128;

struct Walker<'a> {
    parser: Parser<std::str::Chars<'a>>,
    out: Locations,
}

/// Why a walk stopped early: a syntax error or absurd nesting. Either way the index is dropped.
struct Stop;

impl From<ScanError> for Stop {
    fn from(_: ScanError) -> Self {
        Stop
    }
}

impl Walker<'_> {
    fn next(&mut self) -> Result<(Event, Marker), Stop> {
        Ok(self.parser.next_token()?)
    }

    /// Only the first document is indexed, as serde_yaml only reads a single one.
    fn stream(&mut self) -> Result<(), Stop> {
        loop {
            let (ev, mark) = self.next()?;
            match ev {
                Event::StreamEnd => return Ok(()),
                Event::StreamStart | Event::DocumentStart | Event::Nothing => {}
                _ => return self.node(String::new(), ev, mark, None, 0),
            }
        }
    }

    /// Records `path` for the node starting with `ev`, then its children. `key` is the position
    /// of the mapping key this node is the value of, preferred for collections because a block
    /// mapping's own start is wherever its first key happens to be.
    fn node(
        &mut self,
        path: String,
        ev: Event,
        mark: Marker,
        key: Option<Marker>,
        depth: usize,
    ) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop);
        }
        match ev {
            Event::SequenceStart(..) => {
                self.out
                    .positions
                    .insert(path.clone(), key.unwrap_or(mark).into());
                let mut i = 0;
                loop {
                    let (ev, mark) = self.next()?;
                    if ev == Event::SequenceEnd {
                        return Ok(());
                    }
                    self.node(format!("{path}[{i}]"), ev, mark, None, depth + 1)?;
                    i += 1;
                }
            }
            Event::MappingStart(..) => {
                // Without a key (a sequence item), a block mapping's own mark is oddly placed
                // (at its first `:`), so it is located at its first key instead.
                let mut own = key;
                let mut seen: HashMap<String, Position> = HashMap::new();
                loop {
                    let (kev, kmark) = self.next()?;
                    let at = own.get_or_insert(if kev == Event::MappingEnd {
                        mark
                    } else {
                        kmark
                    });
                    self.out
                        .positions
                        .entry(path.clone())
                        .or_insert(Position::from(*at));
                    let name = match kev {
                        Event::MappingEnd => return Ok(()),
                        Event::Scalar(s, ..) => s,
                        // A collection as a key: never a config field, so only step over it.
                        other => {
                            self.node(String::from("?"), other, kmark, None, depth + 1)?;
                            String::from("?")
                        }
                    };
                    let child = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    let at = Position::from(kmark);
                    self.out.keys.insert(child.clone(), at);
                    if let Some(first) = seen.insert(name, at) {
                        self.out.duplicates.push(Duplicate {
                            path: child.clone(),
                            at,
                            first,
                        });
                    }
                    let (vev, vmark) = self.next()?;
                    self.node(child, vev, vmark, Some(kmark), depth + 1)?;
                }
            }
            // Scalars and aliases: the value's own position. An alias is not followed; fields
            // below it fall back to it through `nearest`.
            _ => {
                if let Event::Scalar(text, ..) = ev {
                    self.out.scalars.insert(path.clone(), text);
                }
                self.out.positions.insert(path, mark.into());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: &Locations, path: &str) -> (usize, usize) {
        let p = index
            .get(path)
            .unwrap_or_else(|| panic!("{path} not indexed"));
        (p.line, p.column)
    }

    const BLOCK: &str = "\
listeners:
  - name: http
    address: 127.0.0.1:8080
upstreams:
  app:
    endpoints:
      - 127.0.0.1:3000
      - \"10.0.0.1:3000\"
routes:
  - name: a
    upstream: app
  - name: b
    match:
      path_prefix: /b
  - name: c
    match:
      path_prefix: /c
defaults:
  concurrency:
    queue_timeout: 100ms
";

    #[test]
    fn block_style_paths_point_at_values() {
        let index = index(BLOCK);
        assert_eq!(at(&index, "listeners[0].address"), (3, 14));
        assert_eq!(at(&index, "listeners[0].name"), (2, 11));
        assert_eq!(at(&index, "upstreams.app.endpoints[1]"), (8, 9));
        assert_eq!(at(&index, "routes[2].match.path_prefix"), (17, 20));
        assert_eq!(at(&index, "defaults.concurrency.queue_timeout"), (20, 20));
        // Collections under a key are located at the key.
        assert_eq!(at(&index, "upstreams.app"), (5, 3));
        assert_eq!(at(&index, "routes[1].match"), (13, 5));
        assert!(index.duplicates().is_empty());
    }

    #[test]
    fn flow_style_paths_point_at_values() {
        let text = "\
routes:
  - { name: a, upstream: app }
  - name: b
    match: { path_prefix: /x, methods: [GET, POST] }
upstreams: { app: { endpoints: [\"h:1\", \"h:2\"] } }
";
        let index = index(text);
        assert_eq!(at(&index, "routes[0].upstream"), (2, 26));
        assert_eq!(at(&index, "routes[1].match"), (4, 5));
        assert_eq!(at(&index, "routes[1].match.path_prefix"), (4, 27));
        assert_eq!(at(&index, "routes[1].match.methods[1]"), (4, 46));
        assert_eq!(at(&index, "upstreams.app.endpoints[1]"), (5, 40));
    }

    #[test]
    fn missing_fields_fall_back_to_the_nearest_ancestor_but_not_the_root() {
        let index = index(BLOCK);
        assert_eq!(index.get("routes[0].match.host"), None);
        let p = index.nearest("routes[0].match.host").unwrap();
        assert_eq!((p.line, p.column), (10, 5));
        let p = index.nearest("listeners[0].tls.cert_file").unwrap();
        assert_eq!((p.line, p.column), (2, 5));
        // A flow mapping as a sequence item: also its first key.
        let flow = super::index("routes:\n  - { name: a }\n  - {}\n");
        assert_eq!(at(&flow, "routes[0]"), (2, 7));
        assert_eq!(at(&flow, "routes[1]"), (3, 5));
        assert_eq!(index.nearest("admin.address"), None);
    }

    #[test]
    fn duplicate_keys_are_recorded() {
        let index = index("upstreams:\n  app: {}\n  web: {}\n  app: {}\n");
        assert_eq!(
            index.duplicates(),
            &[Duplicate {
                path: "upstreams.app".into(),
                at: Position { line: 4, column: 3 },
                first: Position { line: 2, column: 3 },
            }]
        );
    }

    #[test]
    fn keys_are_located_at_the_key_and_scalars_keep_their_text() {
        let index = index(BLOCK);
        let key = |path: &str| index.key(path).map(|p| (p.line, p.column));
        assert_eq!(key("defaults.concurrency.queue_timeout"), Some((20, 5)));
        assert_eq!(key("listeners[0].address"), Some((3, 5)));
        assert_eq!(key("upstreams.app"), Some((5, 3)));
        assert_eq!(key("listeners[0]"), None, "a list item has no key");
        assert_eq!(
            index.scalar("defaults.concurrency.queue_timeout"),
            Some("100ms")
        );
        assert_eq!(
            index.scalar("upstreams.app.endpoints[1]"),
            Some("10.0.0.1:3000")
        );
        assert_eq!(
            index.scalar("upstreams.app"),
            None,
            "a mapping is no scalar"
        );

        let flow = super::index("a: { b: 0x10, c: ~, d: , e: '' }\n");
        assert_eq!(flow.key("a.c").map(|p| (p.line, p.column)), Some((1, 15)));
        let texts: Vec<_> = ["a.b", "a.c", "a.d", "a.e"]
            .iter()
            .map(|p| flow.scalar(p))
            .collect();
        assert_eq!(texts, [Some("0x10"), Some("~"), Some(""), Some("")]);
    }

    #[test]
    fn unparsable_text_gives_an_empty_index() {
        let index = index("routes: [\n  - a\n");
        assert_eq!(index.get("routes"), None);
    }

    #[test]
    fn parent_strips_one_segment() {
        assert_eq!(parent("routes[2].match.path_prefix"), "routes[2].match");
        assert_eq!(parent("routes[2]"), "routes");
        assert_eq!(
            parent("upstreams.app.endpoints[1]"),
            "upstreams.app.endpoints"
        );
        assert_eq!(parent("routes"), "");
    }
}
