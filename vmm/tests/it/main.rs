//! kiln-vmm's integration tests, one binary (`it`) with a module per subject: linking one
//! test binary instead of one per file is most of a test build's time on a small machine.
//! The modules without tests (`kvm_support`, `net_guest`, `vsock_guest`, `vsock_mock`) are
//! the helpers the others share.

mod blk;
mod blk_qemu;
mod blk_vhost_user;
mod devices_qemu;
mod kvm_blk;
mod kvm_boot;
mod kvm_guest;
mod kvm_net;
mod kvm_process;
mod kvm_support;
mod kvm_virtio;
mod kvm_vsock;
mod net_guest;
mod net_qemu;
mod vsock_guest;
mod vsock_mock;
mod vsock_qemu;
mod vsock_queue;
mod vsock_transport;
mod vsock_vhost_user;
