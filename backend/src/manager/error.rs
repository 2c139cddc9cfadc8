//! The manager's errors, typed: what went wrong, not how a protocol spells it. `mgmt`
//! turns them into QMP's error classes; other callers (the config runner, tests) read them
//! as they are.

/// A management operation that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No disk, snapshot, pool or job of that name.
    #[error("{0}")]
    NotFound(String),
    /// Anything else, in words for a person.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn failed(desc: impl Into<String>) -> Self {
        Error::Failed(desc.into())
    }

    pub fn not_found(desc: impl Into<String>) -> Self {
        Error::NotFound(desc.into())
    }
}

impl From<thinpool::Error> for Error {
    fn from(e: thinpool::Error) -> Self {
        match e {
            thinpool::Error::NoSuchDevice(_) => Error::not_found(e.to_string()),
            e => Error::failed(e.to_string()),
        }
    }
}

impl From<thinpool::catalog::CatalogError> for Error {
    fn from(e: thinpool::catalog::CatalogError) -> Self {
        Error::failed(e.to_string())
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::failed(format!("{e:#}"))
    }
}
