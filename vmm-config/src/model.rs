//! The configuration model. Field names are kebab-case in YAML.

use crate::size::Size;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub management: Option<ManagementConfig>,
    /// Who may connect to the disks' sockets (all of them, those added at run time too).
    #[serde(default)]
    pub disk_sockets: SocketAccess,
    #[serde(default)]
    pub logging: Option<LoggingConfig>,
}

/// A socket's file mode and group: who may connect. Connecting to a disk's socket is
/// writing to the VM's disk; to the management socket, running the daemon.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SocketAccess {
    /// Octal file mode (default 0600: the daemon's user only).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The socket's group, by name or number (e.g. the group QEMU runs as); default the
    /// daemon's.
    #[serde(default)]
    pub group: Option<String>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: default_mode(),
            group: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    pub name: String,
    pub metadata: PathBuf,
    pub data: PathBuf,
    /// Data block size, 64KiB to 1GiB in multiples of 64KiB (used when creating).
    #[serde(default = "default_block_size")]
    pub block_size: Size,
    /// Sizes of the files to create when they do not exist.
    #[serde(default)]
    pub create: Option<CreateSizes>,
    /// Zero the rest of a newly provisioned block (dm-thin's default; `false` is
    /// `skip_block_zeroing`).
    #[serde(default = "yes")]
    pub zeroing: bool,
    /// What guest discards do.
    #[serde(default)]
    pub discard: DiscardMode,
    /// Give the space of freed data blocks back to the host (a hole punched in a data
    /// file, a discard sent to a data block device) once the commit that freed them is
    /// durable; `false` is dm-thin's `no_discard_passdown`.
    #[serde(default = "yes")]
    pub discard_passdown: bool,
    #[serde(default)]
    pub out_of_space: OutOfSpace,
    #[serde(default)]
    pub low_water: LowWater,
    /// Metadata cache size.
    #[serde(default)]
    pub metadata_cache: Option<Size>,
    /// Serve the pool read-only (dm-thin's `read_only` feature): its metadata never
    /// changes; reads work, and writes to blocks a disk owns alone; writes that need a new
    /// block, snapshots and other changes fail.
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CreateSizes {
    pub data_size: Size,
    #[serde(default)]
    pub metadata_size: Option<Size>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DiscardMode {
    /// Unmap the whole pool blocks a discard covers (space returns to the pool).
    #[default]
    Unmap,
    /// Turn discard support off (dm-thin's `ignore_discard`): guests are not offered
    /// DISCARD, and one sent anyway is answered "unsupported".
    Ignore,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutOfSpace {
    #[serde(default)]
    pub policy: OutOfSpacePolicy,
    /// With `queue`: seconds to hold writes before failing them (dm-thin: 60; 0 = forever).
    #[serde(default = "default_timeout")]
    pub timeout: u64,
}

impl Default for OutOfSpace {
    fn default() -> Self {
        OutOfSpace {
            policy: OutOfSpacePolicy::default(),
            timeout: default_timeout(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OutOfSpacePolicy {
    /// Fail writes that need a new block at once.
    #[default]
    Error,
    /// Hold them until space appears or the timeout passes.
    Queue,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LowWater {
    /// Percent of data blocks in use that raises POOL_LOW_WATERMARK.
    #[serde(default = "default_low_water")]
    pub data: u8,
    #[serde(default = "default_low_water")]
    pub metadata: u8,
}

impl Default for LowWater {
    fn default() -> Self {
        LowWater {
            data: default_low_water(),
            metadata: default_low_water(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskConfig {
    pub name: String,
    /// Pool name; may be left out when there is exactly one pool.
    #[serde(default)]
    pub pool: Option<String>,
    pub size: Size,
    pub socket: PathBuf,
    #[serde(default = "default_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub read_only: bool,
    /// What the guest sees as the serial (at most 20 bytes); default: generated.
    #[serde(default)]
    pub serial: Option<String>,
    /// Create the disk as a clone (snapshot) of this disk or snapshot when it does not exist.
    #[serde(default)]
    pub clone_from: Option<String>,
    /// A read-only image (raw file or block device) that the disk's unprovisioned blocks
    /// read from when it is created (dm-thin's external origin): a golden image.
    #[serde(default)]
    pub external_origin: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManagementConfig {
    pub socket: PathBuf,
    /// File mode of the socket, octal (default 0600).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The socket's group, by name or number; default the daemon's.
    #[serde(default)]
    pub group: Option<String>,
    /// Directories under which management commands may read and write files (stream
    /// files, external origins, merge targets); default: the directories of the pools'
    /// metadata files.
    #[serde(default)]
    pub file_dirs: Option<Vec<PathBuf>>,
    /// Whether `snapshot-send` and replication may run a program (as the daemon's user).
    #[serde(default)]
    pub allow_commands: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoggingConfig {
    #[serde(default = "default_level")]
    pub level: LogLevel,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn default_block_size() -> Size {
    Size(64 << 10)
}
fn yes() -> bool {
    true
}
fn default_timeout() -> u64 {
    60
}
fn default_low_water() -> u8 {
    80
}
fn default_queues() -> u16 {
    crate::limits::DEFAULT_NUM_QUEUES as u16
}
fn default_queue_size() -> u16 {
    crate::limits::DEFAULT_QUEUE_SIZE as u16
}
fn default_mode() -> String {
    "0600".into()
}
fn default_level() -> LogLevel {
    LogLevel::Info
}
