//! virtio-blk over vhost-user: request parsing (pure), execution against a thin device,
//! the vhost-user backend, the relay of its control channel, and the accept loop that
//! serves a disk on its socket.

pub mod backend;
pub mod chain;
pub mod disk;
pub mod execute;
pub mod inflight;
pub mod park;
pub mod relay;
pub mod request;
pub mod serve;
