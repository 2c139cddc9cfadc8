//! Persistent data: the layers under the thin metadata, each in the kernel's format.
//!
//! block I/O and checksums → block manager (cache) → transaction manager (shadowing)
//! → B-trees → space maps.

pub mod block;
pub mod block_manager;
pub mod btree;
pub mod checksum;
pub mod space_map;
pub mod tm;
