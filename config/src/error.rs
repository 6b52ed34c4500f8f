//! Config errors: each names the file, `line:column`, the field and what is wrong, and where a
//! field name is misspelt, the nearest valid one.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

/// One problem with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, 0 when the error concerns the whole file.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The field concerned (`applications[0].deployments[1].model`), empty when none.
    pub field: String,
    /// What is wrong, and how to fix it where that is clear.
    pub message: String,
}

impl ConfigError {
    /// An error about the file as a whole (cannot be read, ...).
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self { file: path.to_path_buf(), line: 0, column: 0, field: String::new(), message: message.into() }
    }

    /// An error at a location in the file.
    pub fn at(path: &Path, location: Location, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: path.to_path_buf(),
            line: location.line(),
            column: location.column(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub(crate) fn single(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Turns a YAML/serde error into a [`ConfigError`], adding a "did you mean" for unknown fields.
pub(crate) fn from_yaml(path: &Path, text: &str, error: &serde_saphyr::Error) -> ConfigError {
    let location = error.location().unwrap_or(Location::UNKNOWN);
    let (field, message) = match error.without_snippet() {
        serde_saphyr::Error::SerdeUnknownField { field, expected, .. } => {
            let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
            let mut message = format!("unknown field `{field}`");
            match nearest(field, &expected) {
                Some(best) => message.push_str(&format!(", did you mean `{best}`?")),
                None if !expected.is_empty() => {
                    message.push_str(&format!("; valid fields: {}", expected.join(", ")))
                }
                None => message.push_str("; this mapping takes no fields"),
            }
            (field.clone(), message)
        }
        serde_saphyr::Error::SerdeMissingField { field, .. } => {
            (field.to_string(), format!("missing required field `{field}`"))
        }
        serde_saphyr::Error::Message { msg, .. } => {
            (key_at(text, location).unwrap_or_default(), first_line(msg))
        }
        other => (key_at(text, location).unwrap_or_default(), first_line(&other.to_string())),
    };
    ConfigError::at(path, location, field, message)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// The valid name closest to `field`, if it is close enough to be a likely typo.
pub(crate) fn nearest(field: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(field, c), c))
        .filter(|(d, c)| *d <= (c.len().max(field.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

/// The mapping key of the value the error points at (used to name the field of a wrong-type
/// error): the key just before the error's column (`{a: 1, b: x}` and JSON too), else the
/// line's first key when the line is `key: value`.
fn key_at(text: &str, location: Location) -> Option<String> {
    let line = text.lines().nth(usize::try_from(location.line()).ok()?.checked_sub(1)?)?;
    let column = usize::try_from(location.column()).ok()?.saturating_sub(1);
    let before: String = line.chars().take(column).collect();
    if let Some(rest) = before.trim_end().strip_suffix(':') {
        let key =
            rest.rsplit(['{', ',', '[', ' ', '\t']).next().unwrap_or_default().trim_matches(['"', '\'']);
        if !key.is_empty() {
            return Some(key.to_string());
        }
    }
    let line = line.trim_start().trim_start_matches("- ");
    let (key, _) = line.split_once(':')?;
    let key = key.trim();
    (!key.is_empty() && !key.contains(' ')).then(|| key.to_string())
}

/// Where `field`, a path of mapping keys (`model_repository.rollout.canary_weight`), is written
/// in `text`: the 1-based line and column of the deepest of its keys found there (the parent's
/// when a key is left at its default), for the checks that run on values that carry no location
/// of their own. Block mappings are followed by indentation, flow mappings (`a: {b: 1}`) on the
/// line they open on; the path stops at an index (`applications[0]`). None when its first key
/// is not at the top of the file (JSON on one line included).
pub(crate) fn locate(text: &str, field: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    // The key found last: its line, the byte where it ends, and the line's indentation.
    let mut at: Option<(usize, usize, usize)> = None;
    for key in field.split('.').take_while(|k| !k.contains('[')) {
        let found = match at {
            None => lines.iter().position(|l| indent(l) == 0 && key_starts(l, key)).map(|i| (i, 0)),
            Some((line, end, parent)) => {
                flow_key(&lines[line][end..], key).map(|col| (line, end + col)).or_else(|| {
                    lines[line + 1..]
                        .iter()
                        .take_while(|l| {
                            l.trim().is_empty() || l.trim_start().starts_with('#') || indent(l) > parent
                        })
                        .position(|l| {
                            let content = l.trim_start().trim_start_matches("- ");
                            key_starts(content, key) || flow_key(l, key).is_some()
                        })
                        .map(|i| {
                            let l = lines[line + 1 + i];
                            (line + 1 + i, l.find(key).unwrap_or(0))
                        })
                })
            }
        };
        let Some((line, col)) = found else { break };
        at = Some((line, col + key.len(), indent(lines[line])));
    }
    at.map(|(line, end, _)| {
        let text = lines[line];
        let col = text[..end].rfind(|c: char| !c.is_alphanumeric() && c != '_').map_or(0, |i| i + 1);
        (line as u64 + 1, col as u64 + 1)
    })
}

/// Whether `line` (its indentation left out) starts with the key `key`.
fn key_starts(line: &str, key: &str) -> bool {
    let line = line.trim_start().trim_start_matches(['"', '\'']);
    line.strip_prefix(key)
        .is_some_and(|rest| rest.trim_start_matches(['"', '\'']).trim_start().starts_with(':'))
}

/// Where the key `key` of a flow mapping starts in `s` (after a `{` or `,`).
fn flow_key(s: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(key).map(|i| from + i) {
        let before = s[..i].trim_end_matches([' ', '\t', '"', '\'']);
        if (before.ends_with('{') || before.ends_with(',')) && key_starts(&s[i..], key) {
            return Some(i);
        }
        from = i + key.len();
    }
    None
}
