//! kiln-vmm: the microVM and the virtio devices it shares with the vhost-user backends.
//!
//! Each device under [`devices`] (blk, net, vsock) is written once and served two ways, and
//! each device folder holds the same files with the same meanings:
//! - `device.rs`: its features and config space.
//! - `handler.rs`: its request logic over a `virtio_queue::Queue` and guest memory, with no
//!   transport in it.
//! - `in_process.rs`: the device on kiln's own virtio-mmio [`transport`], for a kiln VM (the
//!   `kvm` engine): it implements [`transport::VirtioDevice`] and, once activated, runs its
//!   handler on a [`transport::QueueWorker`], the one thread kind that waits on the queue
//!   kicks and on the device's own file descriptors (net's frame port, vsock's host
//!   sockets).
//! - `vhost_user.rs`: a backend on the same handler, served to QEMU (the `qemu` engine) by
//!   [`vhost_user::serve`].
//!
//! Device-specific parts keep names of their own (blk's `chain.rs` and `scheduler.rs`,
//! vsock's `protocol.rs`, `connection.rs` and `muxer/`, net's `qemu_relay.rs`).
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
pub mod smoke;
pub mod transport;
pub mod vcpu;
pub mod vhost_user;
pub mod vm;
