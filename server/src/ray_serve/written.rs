//! The Sluice config a Ray config is written as: one value per line, each line remembering
//! the Ray field it came from ([`Doc::errors`] turns Sluice's errors about a line back into
//! errors about that field).

use serde_json::Value;
use sluice_config::ConfigErrors;

use super::{ValidationError, ValidationErrors};

/// A value of the config being written, with the Ray location each part came from.
pub(super) enum Node {
    Value(Value),
    Object(Vec<Entry>),
    List(Vec<(Node, String)>),
}

pub(super) struct Entry {
    pub key: String,
    pub node: Node,
    pub origin: String,
}

impl Entry {
    pub fn new(key: &str, node: Node, origin: impl Into<String>) -> Self {
        Self { key: key.to_string(), node, origin: origin.into() }
    }

    pub fn value(key: &str, value: Value, origin: impl Into<String>) -> Self {
        Self::new(key, Node::Value(value), origin)
    }
}

/// Sets `key` (replacing an earlier value and its origin).
pub(super) fn set(entries: &mut Vec<Entry>, key: &str, value: Value, origin: String) {
    entries.retain(|e| e.key != key);
    entries.push(Entry::value(key, value, origin));
}

pub(super) fn get<'a>(entries: &'a [Entry], key: &str) -> Option<(&'a Value, &'a str)> {
    entries.iter().find(|e| e.key == key).and_then(|e| match &e.node {
        Node::Value(v) => Some((v, e.origin.as_str())),
        _ => None,
    })
}

/// The config text being written, one value per line, and the Ray location of each line.
#[derive(Default)]
pub(super) struct Doc {
    lines: Vec<String>,
    origins: Vec<String>,
}

fn key(k: &str) -> String {
    format!("{}: ", Value::String(k.to_string()))
}

impl Doc {
    /// The text written so far.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    fn push(&mut self, line: String, origin: &str) {
        self.lines.push(line);
        self.origins.push(origin.to_string());
    }

    /// Writes `node` after `prefix` (`"key": `), from `origin`.
    pub fn node(&mut self, prefix: &str, node: &Node, origin: &str, comma: bool) {
        let c = if comma { "," } else { "" };
        match node {
            Node::Value(v) => self.value(prefix, v, origin, comma),
            Node::Object(entries) => {
                self.push(format!("{prefix}{{"), origin);
                for (i, e) in entries.iter().enumerate() {
                    self.node(&key(&e.key), &e.node, &e.origin, i + 1 < entries.len());
                }
                self.push(format!("}}{c}"), origin);
            }
            Node::List(items) => {
                self.push(format!("{prefix}["), origin);
                for (i, (n, o)) in items.iter().enumerate() {
                    self.node("", n, o, i + 1 < items.len());
                }
                self.push(format!("]{c}"), origin);
            }
        }
    }

    fn value(&mut self, prefix: &str, v: &Value, origin: &str, comma: bool) {
        let c = if comma { "," } else { "" };
        match v {
            Value::Object(m) if !m.is_empty() => {
                self.push(format!("{prefix}{{"), origin);
                for (i, (k, x)) in m.iter().enumerate() {
                    self.value(&key(k), x, &format!("{origin}.{k}"), i + 1 < m.len());
                }
                self.push(format!("}}{c}"), origin);
            }
            Value::Array(a) if !a.is_empty() => {
                self.push(format!("{prefix}["), origin);
                for (i, x) in a.iter().enumerate() {
                    self.value("", x, &format!("{origin}.{i}"), i + 1 < a.len());
                }
                self.push(format!("]{c}"), origin);
            }
            _ => self.push(format!("{prefix}{v}{c}"), origin),
        }
    }

    /// Sluice's errors about the written config, at the Ray fields they came from.
    pub fn errors(&self, e: ConfigErrors) -> ValidationErrors {
        let at = |line: u64| {
            let i = usize::try_from(line).ok().and_then(|l| l.checked_sub(1));
            i.and_then(|i| self.origins.get(i)).cloned().unwrap_or_else(|| "applications".into())
        };
        let err = |e: sluice_config::ConfigError| ValidationError {
            loc: with_key(at(e.line), &e.field),
            msg: without_lines(&e.message),
        };
        ValidationErrors(e.0.into_iter().map(err).collect())
    }
}

/// `loc` (the Ray field on the error's line) with the key of `field` (Sluice's name of what is
/// wrong) when that is a key inside it: a problem with `initial_replicas` is reported at the
/// line of its `autoscaling_config`.
fn with_key(loc: String, field: &str) -> String {
    let mut parts = field.rsplit('.');
    let (Some(key), Some(parent)) = (parts.next(), parts.next()) else { return loc };
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain(key) && loc.rsplit('.').next() == Some(parent) { format!("{loc}.{key}") } else { loc }
}

/// A message without references to lines of the written config, which the user never saw.
fn without_lines(message: &str) -> String {
    let message = match (message.find(" (first defined at line "), message.rfind(')')) {
        (Some(start), Some(end)) if end > start => format!("{}{}", &message[..start], &message[end + 1..]),
        _ => message.to_string(),
    };
    // The YAML reader's type errors end `at line N, column M`.
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => message[..i].to_string(),
        _ => message,
    }
}
