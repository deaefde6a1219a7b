//! The virtio devices kiln offers its guests.

pub mod block;
pub mod in_order;
pub mod net;
pub mod vsock;
