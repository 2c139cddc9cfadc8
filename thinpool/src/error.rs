//! Typed errors of the pool engine.
//!
//! Every error says what went wrong in terms an operator can act on; the daemon maps them
//! onto virtio status codes and QMP error classes, the CLI adds the file name.

use std::io;

/// What kind of metadata block a checksum or layout error was found in.
pub use crate::pdata::block::BlockKind;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("metadata device I/O error during {op} at block {block}: {source}")]
    MetadataIo {
        op: &'static str,
        block: u64,
        #[source]
        source: io::Error,
    },
    #[error("data device I/O error during {op} at byte {offset}: {source}")]
    DataIo {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("external origin I/O error during read at byte {offset}: {source}")]
    OriginIo {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("metadata block {block} ({kind}) has a bad checksum")]
    Checksum { block: u64, kind: BlockKind },
    #[error("metadata block {block} ({kind}) says it is block {found}")]
    WrongLocation {
        block: u64,
        kind: BlockKind,
        found: u64,
    },
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
    /// A block whose checksum is right but whose contents are not what its place in the
    /// metadata needs (a btree node of the wrong tree, keys out of order, …).
    #[error("metadata block {block} ({kind}) is corrupt: {problem}")]
    CorruptBlock {
        block: u64,
        kind: BlockKind,
        problem: String,
    },
    /// Metadata written by a newer format (a version or feature flags this engine does not
    /// know): not damage, so it does not flag the pool for checking.
    #[error("unsupported metadata: {0}")]
    Unsupported(String),
    #[error("not a dm-thin metadata device: {0}")]
    NotThinMetadata(String),
    #[error("the pool is out of data space ({nr_blocks} data blocks, all in use)")]
    OutOfDataSpace { nr_blocks: u64 },
    #[error("the pool is out of metadata space ({free} free metadata blocks, {reserve} held in reserve)")]
    OutOfMetadataSpace { free: u64, reserve: u64 },
    #[error("the metadata device ran out of space in the middle of an operation ({free} blocks free); the transaction is rolled back")]
    MetadataExhausted { free: u64 },
    #[error("the pool is read-only ({0}); reads work, changes are refused")]
    ReadOnly(&'static str),
    #[error("the pool has failed ({0}); only teardown is possible")]
    Failed(String),
    #[error("the pool's metadata is flagged needs_check; run `vhost-thin pool check --clear-needs-check` (or thin_check --clear-needs-check-flag) before writing")]
    NeedsCheck,
    #[error("thin device {0} already exists")]
    DeviceExists(u32),
    #[error("thin device {0} does not exist")]
    NoSuchDevice(u32),
    #[error("transaction id is {actual}, not {expected}")]
    TransactionIdMismatch { expected: u64, actual: u64 },
    #[error("a metadata snapshot is already held (block {0})")]
    MetadataSnapExists(u64),
    #[error("no metadata snapshot is held")]
    NoMetadataSnap,
    #[error("the snapshot time counter is exhausted (2^24 snapshots taken)")]
    TimeExhausted,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("writes acknowledged since the pool's last commit were rolled back after a metadata failure ({0}); a flush cannot vouch for them (restart the daemon after checking the pool: its journal replays them)")]
    RolledBack(String),
    #[error("journal I/O error during {op}: {source}")]
    JournalIo {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the journal is full ({records} changes since the last commit)")]
    JournalFull { records: u64 },
    #[error("the journal refuses changes: {0}")]
    JournalRefused(String),
    #[error("replaying the journal failed at {0}; the pool is left as last committed (move the journal file aside to open it without those writes)")]
    JournalReplay(String),
    #[error("writing the output failed: {0}")]
    Output(#[source] io::Error),
}

impl Error {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    pub(crate) fn corrupt_block(block: u64, kind: BlockKind, problem: impl Into<String>) -> Self {
        Error::CorruptBlock {
            block,
            kind,
            problem: problem.into(),
        }
    }

    /// True when the error means the in-core transaction can no longer be trusted:
    /// the pool must abort to the last commit and flag the metadata for checking.
    pub fn is_metadata_failure(&self) -> bool {
        matches!(
            self,
            Error::MetadataIo { .. }
                | Error::Checksum { .. }
                | Error::WrongLocation { .. }
                | Error::Corrupt(_)
                | Error::CorruptBlock { .. }
                | Error::MetadataExhausted { .. }
                | Error::JournalIo { .. }
                | Error::JournalRefused(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;
