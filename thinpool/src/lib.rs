//! `thinpool`: a thin-provisioning pool engine whose metadata is bit-compatible with the
//! Linux kernel's dm-thin target (and so with thin-provisioning-tools).
//!
//! Layers, bottom up: [`storage`] (the device seam) → [`pdata`] (checksummed blocks, cache,
//! transaction manager, copy-on-write B-trees, reference-counted space maps) → [`thin`]
//! (superblock, device details, the two-level mapping tree) → [`pool`] (the data path with
//! per-block locking, modes, commit policy). [`check`] verifies a pool the way `thin_check`
//! does; [`xml`] reads and writes `thin_dump` XML; [`registry`] keeps names and sizes
//! ([`names`] says what a name is), and [`catalog`] owns a pool with its registry: every
//! change to the two goes through it;
//! [`origin`] serves external origins (golden images) and [`merge`] writes a thin device
//! back into one.

pub mod catalog;
pub mod cells;
pub mod check;
pub mod delta;
pub mod dump;
pub mod error;
pub mod hash;
pub mod journal;
pub mod merge;
pub mod names;
pub mod origin;
pub mod pdata;
pub mod storage;

pub use error::{Error, Result};
pub mod pool;
pub mod registry;
pub mod stream;
pub mod thin;
pub mod xml;
