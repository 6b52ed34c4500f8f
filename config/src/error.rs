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
