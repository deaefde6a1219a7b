//! put-file, get-file, stat and sync against the real agent binary.

use crate::common;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::common::{is_root, Agent, Noise};
use kiln_agent::frame::{FrameReader, FrameWriter};
use kiln_agent::message::{ErrorKind, FileEnd, Hello, Message, PutFileRequest};
use kiln_agent::{ClientError, FileKind, PutOptions};
use sha2::{Digest, Sha256};

/// A writer that only hashes and counts (a download sink that keeps nothing).
struct HashSink(Sha256, u64);

impl Write for HashSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.update(b);
        self.1 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn sha_of(r: &mut dyn Read) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize().into();
        }
        h.update(&buf[..n]);
    }
}

fn temp_leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln-tmp"))
        .collect()
}

#[test]
fn one_gib_upload_and_download_with_checksums() {
    // 1 GiB in release builds (what CI runs); debug builds hash too slowly for that.
    let len: u64 = if cfg!(debug_assertions) {
        64 << 20
    } else {
        1 << 30
    };
    let a = Agent::start(&[]);
    let mut c = a.client();
    let dest = a.path("big.bin");
    let expected = sha_of(&mut Noise::new(42, len));

    let t = Instant::now();
    let opts = PutOptions {
        mode: 0o640,
        fsync: false,
        ..PutOptions::default()
    };
    let done = c
        .put_reader(
            &mut Noise::new(42, len),
            dest.to_str().unwrap(),
            &opts,
            Some(len),
        )
        .unwrap();
    let up = t.elapsed();
    assert_eq!(done.size, len);
    assert_eq!(done.sha256, expected);
    let md = std::fs::metadata(&dest).unwrap();
    assert_eq!(md.len(), len);
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert!(temp_leftovers(a.dir.path()).is_empty());

    // Download into a sink that keeps nothing: streamed, checked at the end.
    let t = Instant::now();
    let mut sink = HashSink(Sha256::new(), 0);
    let (meta, end) = c.get_to_writer(dest.to_str().unwrap(), &mut sink).unwrap();
    let down = t.elapsed();
    assert_eq!((meta.size, meta.mode), (len, 0o640));
    assert_eq!(end.sha256, expected);
    assert_eq!(<[u8; 32]>::from(sink.0.finalize()), expected);
    assert_eq!(sink.1, len);
    eprintln!(
        "{} MiB: upload {:.0} MB/s, download {:.0} MB/s",
        len >> 20,
        len as f64 / up.as_secs_f64() / 1e6,
        len as f64 / down.as_secs_f64() / 1e6
    );

    std::fs::remove_file(&dest).unwrap();

    // To a local path (temporary name, renamed once verified), on a smaller file.
    let small = a.path("small.bin");
    let small_len = 8u64 << 20;
    c.put_reader(
        &mut Noise::new(3, small_len),
        small.to_str().unwrap(),
        &PutOptions::default(),
        None,
    )
    .unwrap();
    let local = a.path("copy.bin");
    c.get_file(small.to_str().unwrap(), &local).unwrap();
    assert_eq!(
        sha_of(&mut std::fs::File::open(&local).unwrap()),
        sha_of(&mut Noise::new(3, small_len))
    );
    assert!(temp_leftovers(a.dir.path()).is_empty());
}

#[test]
fn put_file_sets_mode_owner_and_replaces_atomically() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let src = a.path("src.txt");
    std::fs::write(&src, b"new contents\n").unwrap();
    let dest = a.path("sub/dir/dest.txt");
    // Missing parent without create_dirs: a clear error, nothing created.
    let e = c
        .put_file(&src, dest.to_str().unwrap(), &PutOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::NotFound),
        "{e}"
    );
    let opts = PutOptions {
        mode: 0o4750,
        owner: if is_root() {
            Some("nobody:nogroup".into())
        } else {
            None
        },
        fsync: true,
        create_dirs: true,
    };
    c.put_file(&src, dest.to_str().unwrap(), &opts).unwrap();
    let md = std::fs::metadata(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"new contents\n");
    assert_eq!(md.permissions().mode() & 0o7777, 0o4750);
    if is_root() {
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
    } else {
        kiln_e2e::skip("ownership part of put_file_sets_mode_owner needs root");
    }
    // Relative paths and directories are refused.
    let e = c.put_file(&src, "relative/path", &opts).unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::InvalidRequest),
        "{e}"
    );
    let e = c
        .put_file(&src, a.dir.path().to_str().unwrap(), &opts)
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::InvalidRequest),
        "{e}"
    );
    // Unknown owner.
    let e = c
        .put_file(
            &src,
            dest.to_str().unwrap(),
            &PutOptions {
                owner: Some("no-such-user-kiln".into()),
                ..PutOptions::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::UnknownUser),
        "{e}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"new contents\n");
    assert!(temp_leftovers(&a.path("sub/dir")).is_empty());
}

/// Speak the protocol by hand to send a wrong checksum.
#[test]
fn a_bad_checksum_installs_nothing() {
    let a = Agent::start(&[]);
    let dest = a.path("target.txt");
    std::fs::write(&dest, b"original").unwrap();
    let s = UnixStream::connect(&a.sock).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let mut r = FrameReader::new(s);
    w.send(&Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        client: "test".into(),
    }))
    .unwrap();
    assert!(matches!(r.read().unwrap(), Message::HelloReply(_)));
    w.send(&Message::PutFile(PutFileRequest {
        path: dest.display().to_string(),
        mode: 0o644,
        owner: None,
        size: None,
        fsync: false,
        create_dirs: false,
    }))
    .unwrap();
    assert_eq!(r.read().unwrap(), Message::Ack);
    w.send(&Message::FileData(b"tampered".to_vec())).unwrap();
    w.send(&Message::FileEnd(FileEnd {
        size: 8,
        sha256: Sha256::digest(b"original").into(),
    }))
    .unwrap();
    match r.read().unwrap() {
        Message::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Checksum);
            assert!(e.message.contains("sha256"), "{}", e.message);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&dest).unwrap(), b"original");
    assert!(temp_leftovers(a.dir.path()).is_empty());

    // A disconnect in the middle of an upload leaves no temporary file either.
    w.send(&Message::PutFile(PutFileRequest {
        path: a.path("half.bin").display().to_string(),
        mode: 0o644,
        owner: None,
        size: Some(1 << 20),
        fsync: false,
        create_dirs: false,
    }))
    .unwrap();
    assert_eq!(r.read().unwrap(), Message::Ack);
    w.send(&Message::FileData(vec![1; 1000])).unwrap();
    drop(w);
    drop(r);
    assert!(common::wait_until(
        std::time::Duration::from_secs(5),
        || { temp_leftovers(a.dir.path()).is_empty() }
    ));
    assert!(!a.path("half.bin").exists());
}

#[test]
fn get_file_errors_and_stat() {
    let a = Agent::start(&[]);
    let mut c = a.client();
    let e = c
        .get_to_writer("/no/such/file", &mut io::sink())
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::NotFound),
        "{e}"
    );
    let e = c.get_to_writer("/", &mut io::sink()).unwrap_err();
    assert!(
        matches!(&e, ClientError::Remote(r) if r.kind == ErrorKind::InvalidRequest),
        "{e}"
    );

    let f = a.path("f");
    std::fs::write(&f, b"12345").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&f, a.path("link")).unwrap();
    let st = c.stat(f.to_str().unwrap()).unwrap().unwrap();
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, 5, 0o600));
    let st = c.lstat(a.path("link").to_str().unwrap()).unwrap().unwrap();
    assert_eq!(st.kind, FileKind::Symlink);
    assert_eq!(st.link_target.as_deref(), f.to_str());
    let st = c.stat(a.path("link").to_str().unwrap()).unwrap().unwrap();
    assert_eq!(st.kind, FileKind::File);
    assert_eq!(
        c.stat(a.dir.path().to_str().unwrap())
            .unwrap()
            .unwrap()
            .kind,
        FileKind::Dir
    );
    assert_eq!(c.stat(a.path("missing").to_str().unwrap()).unwrap(), None);
    c.sync().unwrap();
}
