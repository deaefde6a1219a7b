//! What the virtio-blk device offers: feature bits, configuration space and limits.
//!
//! Both transports (the kiln-vmm virtio transport and vhost-user) read the same values from
//! here, so a guest sees the same disk whichever way it is served.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes in a virtio-blk sector; every offset in a request is counted in these.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors a queue may hold. 256 matches QEMU's default queue size for vhost-user-blk.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments a request may carry (the driver reserves two for header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most ranges in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one discard or write-zeroes range may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most queues a device may be configured with.
pub const MAX_QUEUES: u16 = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the configuration space this device exposes (up to and including
/// `write_zeroes_may_unmap` and its padding); reads past it return zeroes.
pub const CONFIG_SPACE_SIZE: usize = 60;

/// How a disk is offered to the guest.
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Offer the disk read-only (VIRTIO_BLK_F_RO); writes get VIRTIO_BLK_S_IOERR. A disk
    /// whose `BlockDevice::read_only()` is true is always offered read-only.
    pub read_only: bool,
    /// The GET_ID answer (the guest's `/sys/block/vdX/serial`), at most 20 bytes; longer
    /// serials are cut.
    pub serial: String,
    /// Number of request queues (1..=16).
    pub num_queues: u16,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            read_only: false,
            serial: String::new(),
            num_queues: 1,
        }
    }
}

/// The fixed description of one virtio-blk device: what it offers and its config space.
#[derive(Debug, Clone)]
pub struct BlockDeviceConfig {
    /// Disk size in bytes (a partial last sector is not visible to the guest).
    pub size: u64,
    pub read_only: bool,
    pub serial: [u8; ID_BYTES],
    pub num_queues: u16,
}

impl BlockDeviceConfig {
    /// Describe a device for a disk of `size` bytes. `num_queues` is clamped to 1..=16.
    pub fn new(size: u64, disk_read_only: bool, opts: &BlockOptions) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let bytes = opts.serial.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        BlockDeviceConfig {
            size,
            read_only: disk_read_only || opts.read_only,
            serial,
            num_queues: opts.num_queues.clamp(1, MAX_QUEUES),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The virtio feature bits the device offers (transport-independent ones; vhost-user adds
    /// its protocol-features bit itself).
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        if self.num_queues > 1 {
            f |= 1u64 << VIRTIO_BLK_F_MQ;
        }
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            // Discard and write-zeroes change the disk, so a read-only disk offers neither.
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space as the guest reads it (little-endian, virtio 1.x layout).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // size_max (8..12) is left 0: not offered, segments may be any size.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20) not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // topology (24..32) not offered; wce (32) 0: writeback is decided by FLUSH.
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        if !self.read_only {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            // write_zeroes_may_unmap: the block layer may deallocate zeroed ranges.
            c[56] = 1;
        }
        c
    }

    /// `size` bytes of the configuration space from `offset`; bytes past the fields this
    /// device knows read as zero (newer drivers ask for more fields than we offer). `None`
    /// when the window is absurd (past 4 KiB).
    pub fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let end = offset.checked_add(size)?;
        if end > 4096 {
            return None;
        }
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(v) = space.get(offset as usize + i) {
                *b = *v;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let cfg = BlockDeviceConfig::new(
            1 << 20,
            false,
            &BlockOptions {
                read_only: false,
                serial: "kiln-disk-serial-that-is-too-long".into(),
                num_queues: 2,
            },
        );
        let c = cfg.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(&cfg.serial, b"kiln-disk-serial-tha");
        assert_ne!(cfg.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(cfg.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let tail = cfg.read_config(56, 16).unwrap();
        assert_eq!(tail.len(), 16);
        assert_eq!(tail[0], 1);
        assert!(tail[4..].iter().all(|b| *b == 0));
        assert!(cfg.read_config(u32::MAX, 2).is_none());
    }

    #[test]
    fn read_only_offers_no_discard() {
        let cfg = BlockDeviceConfig::new(4096, true, &BlockOptions::default());
        let f = cfg.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
