//! Configuration errors that say where and how to fix.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field at fault, e.g. `disks[1].num-queues`.
    pub field: Option<String>,
    pub message: String,
    /// What would be valid.
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(crate) fn suggest(word: &str, candidates: &[&str]) -> Option<String> {
    let normalized = word.replace('_', "-").to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (distance(&normalized, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c.to_string())
}

/// Turns a YAML/serde error into a located ConfigError with a hint.
pub(crate) fn from_yaml(e: serde_norway::Error, file: &str) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (Some(l.line()), Some(l.column())))
        .unwrap_or((None, None));
    let raw = e.to_string();
    // serde_norway appends " at line L column C"; the location is reported separately.
    let mut message = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw.clone(),
    };
    let mut field = None;
    // "disks[0]: unknown field `num_queue`, expected one of ..." → path and field.
    if let Some((path, rest)) = message.split_once(": ") {
        if !path.contains(' ') {
            field = Some(path.to_string());
            message = rest.to_string();
        }
    }
    let mut hint = None;
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(name) = rest.split('`').next() {
            let expected: Vec<&str> = rest
                .split("expected ")
                .nth(1)
                .map(|s| s.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            // serde lists the fields valid at that place (deny_unknown_fields on every
            // struct of the model), so the hint is drawn from those alone.
            hint = suggest(name, &expected).map(|s| format!("did you mean `{s}`?"));
            if hint.is_none() && !expected.is_empty() {
                hint = Some(format!("valid fields here: {}", expected.join(", ")));
            }
            message = format!("unknown field `{name}`");
        }
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some(name) = rest.split('`').next() {
            let expected: Vec<&str> = rest
                .split("expected ")
                .nth(1)
                .map(|s| s.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            hint = suggest(name, &expected)
                .map(|s| format!("did you mean `{s}`?"))
                .or_else(|| Some(format!("valid values: {}", expected.join(", "))));
            message = format!("unknown value `{name}`");
        }
    }
    ConfigError {
        file: file.to_string(),
        line,
        column,
        field,
        message,
        hint,
    }
}
