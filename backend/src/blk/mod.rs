//! virtio-blk over vhost-user: request parsing (pure), execution against a thin device,
//! the vhost-user backend, active mirroring to a second device (disk-migrate), the relay of its control channel, and the accept loop that
//! serves a disk on its socket.

pub mod backend;
pub mod chain;
pub mod disk;
pub mod execute;
pub mod inflight;
pub mod mirror;
pub mod park;
pub mod poll;
pub mod relay;
pub mod request;
pub mod serve;
