//! virtio-blk over vhost-user: request parsing (pure), execution against a thin device,
//! the vhost-user backend, and the relay of its control channel.

pub mod backend;
pub mod disk;
pub mod execute;
pub mod relay;
pub mod request;
