//! kiln-vmm: the microVM and the virtio devices it shares with the vhost-user backends.
//!
//! Each device under [`devices`] (blk, net, vsock) is written once and served two ways:
//! - `device.rs` holds its features and config space, and `inorder_handler.rs` its request
//!   logic over a `virtio_queue::Queue` and guest memory, with no transport in it.
//! - In process, for a kiln VM (the `kvm` engine): the device implements
//!   [`transport::VirtioDevice`] behind the virtio-mmio [`transport`]. blk is
//!   `transport/block.rs` (its handler on a [`transport::QueueWorker`]); net is
//!   `devices/net/in_process.rs` and vsock `devices/vsock/queue_handler.rs`, each with a
//!   thread of its own that also waits on the frame port or the host sockets.
//! - Over vhost-user, for QEMU (the `qemu` engine): each device's `vhost_user.rs` is a
//!   backend on the same handler, served by [`vhost_user::serve`].
//!
//! The rest is the VM itself: [`vm`], [`vcpu`], [`memory`], [`bus`], [`boot`], [`arch`],
//! [`serial`] and [`power`], put together by [`machine`] and run one VM per process by
//! [`process`].

pub mod arch;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod doctor;
pub mod exit;
pub mod machine;
pub mod memory;
pub mod phases;
pub mod power;
pub mod process;
pub mod serial;
pub mod transport;
pub mod vcpu;
pub mod vhost_user;
pub mod vm;
