//! The YAML configuration of vhost-thin: pools, disks, the management socket, logging.
//!
//! Parsing is strict: unknown fields are errors, and every error names the file, the line
//! and column, the field, and what would be valid (`unknown field `num_queue`, did you mean
//! `num-queues`?`). The YAML crate is `serde_norway`, a maintained fork of the archived
//! `serde_yaml` 0.9 with the same API and error locations.

// Configuration errors are rare, carry their location and hint, and are never on a hot
// path: their size does not matter.
#![allow(clippy::result_large_err)]

mod error;
pub mod limits;
mod model;
mod size;
mod validate;

pub use error::ConfigError;
pub use model::*;
pub use size::{parse_size, Size, SIZE_UNITS};

use std::path::Path;

/// Parses and validates configuration text; `file` is used in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let cfg: Config = serde_norway::from_str(text).map_err(|e| error::from_yaml(e, file))?;
    validate::validate(&cfg, text, file)?;
    Ok(cfg)
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read the file: {e}"),
        hint: None,
    })?;
    parse(&text, &file)
}
