//! Thin-provisioning metadata on top of the persistent-data layers: superblock, device
//! details, the two-level mapping tree (thin id → virtual block → data block + time).

pub mod device;
pub mod image;
pub mod metadata;
pub mod superblock;
pub mod usage;
