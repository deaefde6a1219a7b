//! The virtio devices kiln offers its guests: blk, net and vsock, each a folder with the same
//! files (`device.rs`, `handler.rs`, `in_process.rs`, `vhost_user.rs`; see the crate docs),
//! and [`in_order`], the queue walk their handlers share.

pub mod block;
pub mod in_order;
pub mod net;
pub mod vsock;
