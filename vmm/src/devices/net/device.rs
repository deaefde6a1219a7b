//! virtio-net features and configuration space.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Queue 0 receives (device -> driver), queue 1 transmits.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;

/// The net header with VERSION_1 or MRG_RXBUF (`struct virtio_net_hdr_v1`); 10 bytes otherwise.
pub const HDR_LEN_V1: usize = 12;
pub const HDR_LEN_LEGACY: usize = 10;

/// The largest frame a guest may transmit: no TSO/GSO is offered, so one MTU-sized frame
/// (1500 + Ethernet header + a VLAN tag).
pub const MAX_TX_FRAME: usize = 1518;

/// Configuration of one virtio-net device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetDeviceConfig {
    pub mac: [u8; 6],
}

impl NetDeviceConfig {
    pub fn new(mac: [u8; 6]) -> Self {
        NetDeviceConfig { mac }
    }

    /// Features offered: no offloads, so every frame is a plain Ethernet frame with a full
    /// checksum, which is what the switch and TAP ports carry.
    pub fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_NET_F_MAC)
            | (1u64 << VIRTIO_NET_F_STATUS)
            | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs.
    pub fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    /// A read of the configuration space; `None` when out of range.
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let c = self.config_space();
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        c.get(start..end).map(<[u8]>::to_vec)
    }
}

/// The header length the driver uses for the negotiated features.
pub fn header_len(acked: u64) -> usize {
    if acked & ((1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        HDR_LEN_V1
    } else {
        HDR_LEN_LEGACY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_mac_and_link_up() {
        let c = NetDeviceConfig::new([2, 1, 2, 3, 4, 5]);
        assert_eq!(c.read_config(0, 6).unwrap(), vec![2, 1, 2, 3, 4, 5]);
        assert_eq!(c.read_config(6, 2).unwrap(), vec![1, 0]);
        assert!(c.read_config(8, 4).is_none());
        assert!(c.read_config(u32::MAX, 2).is_none());
        assert_eq!(header_len(c.features()), 12);
        assert_eq!(header_len(0), 10);
    }
}
