//! The virtio-vsock device model: features, queues and config space.

use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{Result, VsockError};

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size offered to the driver in a kiln VM.
pub const QUEUE_SIZE: u16 = 256;
/// Queue index of the RX queue (device -> driver).
pub const RX_QUEUE: usize = 0;
/// Queue index of the TX queue (driver -> device).
pub const TX_QUEUE: usize = 1;
/// Queue index of the event queue. Only a kiln VM serves it; over vhost-user QEMU keeps the
/// event queue to itself and the backend sees RX and TX only.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues the device has in a kiln VM.
pub const NUM_QUEUES: usize = 3;
/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// virtio features the device offers.
pub fn avail_features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
}

/// The device's configuration: the guest's context ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    guest_cid: u64,
}

impl VsockConfig {
    /// A config for `guest_cid`, which must be a real guest CID (3 and above, below
    /// `u32::MAX`: Linux keeps CIDs in 32 bits).
    pub fn new(guest_cid: u64) -> Result<Self> {
        if guest_cid <= 2 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidGuestCid(guest_cid));
        }
        Ok(Self { guest_cid })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The config space as the driver sees it: `le64 guest_cid`.
    pub fn bytes(&self) -> [u8; 8] {
        self.guest_cid.to_le_bytes()
    }

    /// Reads `size` bytes of config space at `offset`; out-of-range reads return what lies
    /// inside the space (possibly nothing), never an error, as the virtio transports expect.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        bytes[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_cids_are_rejected() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(VsockConfig::new(cid).is_err(), "cid {cid}");
        }
        assert_eq!(VsockConfig::new(3).map(|c| c.guest_cid()).ok(), Some(3));
    }

    #[test]
    fn config_space_reads_are_bounded() {
        let c = VsockConfig::new(0x1234_5678).expect("valid cid");
        assert_eq!(c.read(0, 8), 0x1234_5678u64.to_le_bytes().to_vec());
        assert_eq!(c.read(4, 4), vec![0, 0, 0, 0]);
        assert_eq!(c.read(0, 4), vec![0x78, 0x56, 0x34, 0x12]);
        assert!(c.read(8, 4).is_empty());
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
        assert_eq!(c.read(6, 100).len(), 2);
    }

    #[test]
    fn features_include_version_1() {
        assert_ne!(avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
