//! What a management client may reach on the host beyond the pools: files under the
//! directories the operator allowed, and programs only when the operator allowed them.
//!
//! The management socket is as powerful as the daemon's user (see docs/SECURITY.md), but
//! what it can touch outside the pools is confined by default: a stream file written
//! (`snapshot-send`) or read (`snapshot-receive`), an external origin read (`disk-add`) or
//! written back into (`origin-merge`) must lie under one of the allowed directories, after
//! every symlink and `..` is resolved; and `snapshot-send`/`replication-start` run a
//! program only with `allow-commands`. What the operator configures (pools, the
//! configuration's disks and their external origins) is not confined: it is the operator's
//! own choice.

use super::error::Error;
use std::path::{Path, PathBuf};

/// The operator's limits on management clients.
#[derive(Clone, Debug, Default)]
pub struct Confinement {
    /// Canonical directories; files under them (at any depth) may be used.
    dirs: Vec<PathBuf>,
    /// Whether programs may be run.
    commands: bool,
}

impl Confinement {
    /// Allows files under `dirs` (those that exist; each resolved to its canonical path)
    /// and, with `commands`, running programs.
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>, commands: bool) -> Self {
        let mut canonical: Vec<PathBuf> = Vec::new();
        for d in dirs {
            match std::fs::canonicalize(&d) {
                Ok(c) if c.is_dir() => {
                    if !canonical.contains(&c) {
                        canonical.push(c);
                    }
                }
                _ => tracing::warn!(
                    "management file directory {} is not a directory; ignored",
                    d.display()
                ),
            }
        }
        Confinement {
            dirs: canonical,
            commands,
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn commands_allowed(&self) -> bool {
        self.commands
    }

    fn outside(&self, what: &str, path: &Path) -> Error {
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        Error::failed(format!(
            "{what} {} is outside the directories management clients may use ({}); the operator allows more with management.file-dirs (see docs/SECURITY.md)",
            path.display(),
            if dirs.is_empty() {
                "none".to_string()
            } else {
                dirs.join(", ")
            }
        ))
    }

    fn under(&self, p: &Path) -> bool {
        self.dirs.iter().any(|d| p.starts_with(d))
    }

    /// An existing file a client names to be read or written in place: its canonical
    /// path, if that lies under an allowed directory.
    pub fn existing(&self, what: &str, path: &Path) -> Result<PathBuf, Error> {
        let c = std::fs::canonicalize(path)
            .map_err(|e| Error::failed(format!("{what} {}: {e}", path.display())))?;
        if !self.under(&c) {
            return Err(self.outside(what, path));
        }
        Ok(c)
    }

    /// A file a client names to be created: its path with the directory resolved, if that
    /// lies under an allowed directory. (The file is then created with `O_EXCL` and
    /// `O_NOFOLLOW`, so a link planted at the name is not followed.)
    pub fn new_file(&self, what: &str, path: &Path) -> Result<PathBuf, Error> {
        let resolved = crate::socket::resolve(path)
            .map_err(|e| Error::failed(format!("{what} {}: {e}", path.display())))?;
        if !self.under(&resolved) {
            return Err(self.outside(what, path));
        }
        Ok(resolved)
    }

    /// Refused unless the operator allowed running programs.
    pub fn command(&self, what: &str) -> Result<(), Error> {
        if self.commands {
            return Ok(());
        }
        Err(Error::failed(format!(
            "{what} runs a program, which the operator has not allowed (management.allow-commands, or serve --allow-commands; see docs/SECURITY.md)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_count_as_under_a_directory_only_once_links_and_dots_are_resolved() {
        let base = tempfile::tempdir().unwrap();
        let allowed = base.path().join("allowed");
        let other = base.path().join("other");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret"), b"x").unwrap();
        std::fs::write(allowed.join("img"), b"x").unwrap();
        std::os::unix::fs::symlink(other.join("secret"), allowed.join("link")).unwrap();
        let c = Confinement::new([allowed.clone()], false);
        assert!(c.existing("f", &allowed.join("img")).is_ok());
        assert!(c.existing("f", &allowed.join("link")).is_err());
        assert!(c
            .existing("f", &allowed.join("..").join("other").join("secret"))
            .is_err());
        assert!(c.new_file("f", &allowed.join("new")).is_ok());
        assert!(c.new_file("f", &allowed.join("..").join("new")).is_err());
        assert!(c.new_file("f", &allowed.join("link")).is_err());
        assert!(c.command("x").is_err());
        assert!(Confinement::new([], true).command("x").is_ok());
        assert!(Confinement::new([], true)
            .existing("f", &allowed.join("img"))
            .is_err());
    }
}
