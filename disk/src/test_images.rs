//! Test fixtures: a qcow2 chain holding every kind of cluster, and converted copies of it.
//! Used by kiln-disk's own tests and, through the `test-images` feature, by kiln-vmm's
//! virtio-blk placement tests; not part of the API. Failures panic: this runs in tests only.

use std::path::{Path, PathBuf};

use crate::qcow2::meta::{Cluster, Meta};
use crate::{
    convert, create, open, BlockDevice, Compression, ConvertOptions, CreateOptions, Format,
    OpenOptions,
};

/// Cluster size of the fixture images (small, so a few clusters are quick to make).
pub const CS: u64 = 4096;
/// Virtual size of the fixture images: 64 clusters.
pub const SIZE: u64 = 64 * CS;

/// A seeded xorshift64 generator, so a failing case can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Random, but from 16 values, so it compresses (compressed clusters get made).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() % 16) as u8 * 17).collect()
    }
}

/// An empty qcow2 of [`SIZE`] with [`CS`] clusters, over `backing` if given.
pub fn qcow2(path: &Path, backing: Option<&Path>) {
    create(
        path,
        &CreateOptions {
            size: Some(SIZE),
            cluster_size: CS,
            backing: backing.map(|b| b.to_str().unwrap().to_string()),
            backing_format: backing.map(|_| Format::Qcow2),
            ..Default::default()
        },
    )
    .unwrap();
}

/// base: data in clusters 8..40 and 50..52, the rest unallocated (zeroes). top (over
/// base): a write from the middle of cluster 20 to just into cluster 30 (copy-on-write of
/// the partial clusters from base), zero-flagged clusters 35..38 over base data, data in
/// 60..62 where base has nothing; everything else unallocated, read from base. Returns the
/// top image and what the chain reads as.
pub fn every_kind_chain(dir: &Path, rng: &mut Rng) -> (PathBuf, Vec<u8>) {
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    qcow2(&base, None);
    let mut model = vec![0u8; SIZE as usize];
    {
        let b = open(&base, OpenOptions::read_write()).unwrap();
        for (from, to) in [(8, 40), (50, 52)] {
            let data = rng.bytes(((to - from) * CS) as usize);
            b.write_at(&data, from * CS).unwrap();
            model[(from * CS) as usize..(to * CS) as usize].copy_from_slice(&data);
        }
        b.flush().unwrap();
    }
    qcow2(&top, Some(&base));
    {
        let t = open(&top, OpenOptions::read_write()).unwrap();
        let (a, z) = (20 * CS + 100, 30 * CS + 7);
        let data = rng.bytes((z - a) as usize);
        t.write_at(&data, a).unwrap();
        model[a as usize..z as usize].copy_from_slice(&data);
        t.write_zeroes(35 * CS, 3 * CS).unwrap();
        model[(35 * CS) as usize..(38 * CS) as usize].fill(0);
        let data = rng.bytes((2 * CS) as usize);
        t.write_at(&data, 60 * CS).unwrap();
        model[(60 * CS) as usize..(62 * CS) as usize].copy_from_slice(&data);
        t.flush().unwrap();
    }
    // The kinds the tests are about really are there.
    let meta = Meta::open(std::fs::File::open(&top).unwrap()).unwrap();
    assert_eq!(meta.lookup(36).unwrap(), Cluster::Zero);
    assert_eq!(meta.lookup(10).unwrap(), Cluster::Unallocated);
    assert!(matches!(meta.lookup(25).unwrap(), Cluster::Data(_)));
    (top, model)
}

/// `src` converted to `dst` with [`CS`] clusters; a compressed copy must hold compressed
/// clusters.
pub fn converted(src: &dyn BlockDevice, dst: &Path, format: Format, compress: Option<Compression>) {
    let stats = convert(
        src,
        dst,
        &ConvertOptions {
            format,
            compress,
            cluster_size: CS,
            threads: 1,
            progress: None,
            sync: false,
        },
    )
    .unwrap();
    if compress.is_some() {
        assert!(stats.compressed_clusters > 0, "{stats:?}");
    }
}
