//! vhost-thin: a vhost-user-blk daemon serving thin devices of a dm-thin-compatible pool,
//! and its offline CLI.

pub mod blk;
pub mod config_run;
pub mod ctl;
pub mod daemon;
pub mod events;
pub mod logging;
pub mod manager;
pub mod mgmt;
pub mod offline;
pub mod pools;
pub mod progress;
pub mod replica_names;
pub mod serve_cmd;
pub mod size;
pub mod socket;
pub mod sync;
pub mod usage;
