//! virtio-blk over vhost-user: request parsing (pure), execution against a thin device,
//! and the vhost-user backend.

pub mod backend;
pub mod disk;
pub mod execute;
pub mod request;
