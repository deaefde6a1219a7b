//! The virtio devices kiln offers its guests.

pub mod block;
pub mod net;
pub mod vsock;
