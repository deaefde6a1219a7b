//! A tiny static AF_VSOCK program for the real-guest vsock test (busybox has no vsock
//! support). Built by the test with `rustc -C target-feature=+crt-static`; std only, so it
//! needs no crate. Modes:
//!   listen <port>                     echo every connection back, one thread each
//!   connect <cid> <port> <bytes> <seed>  send a pattern, read the echo, verify it
#![allow(clippy::all)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const VMADDR_CID_ANY: u32 = u32::MAX;
const SHUT_WR: i32 = 1;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut SockaddrVm, len: *mut u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
}

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        zero: [0; 4],
    }
}

fn check(rc: i32, what: &str) -> i32 {
    if rc < 0 {
        eprintln!("vsock-helper: {what}: {}", std::io::Error::last_os_error());
        println!("GUEST-FAIL {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    rc
}

/// The byte stream both sides agree on: `kiln_e2e::pattern::pattern`, repeated here because
/// this program is built with rustc alone, without crates.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn echo(fd: i32) {
    // SAFETY: fd is a connected socket this thread owns from here on.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if f.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    // SAFETY: shutdown(2) on a descriptor this function owns; no memory is passed.
    unsafe { shutdown(fd, SHUT_WR) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> u64 { args.get(i).and_then(|a| a.parse().ok()).unwrap_or(0) };
    match args.get(1).map(String::as_str) {
        Some("listen") => {
            let port = arg(2) as u32;
            // SAFETY: socket(2) takes only integers.
            let fd = check(
                unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) },
                "socket",
            );
            let a = addr(VMADDR_CID_ANY, port);
            // SAFETY: `a` is a valid sockaddr_vm of the size passed, alive for the call.
            check(
                unsafe { bind(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) },
                "bind",
            );
            // SAFETY: listen(2) takes only integers.
            check(unsafe { listen(fd, 64) }, "listen");
            println!("VSOCK-LISTENING {port}");
            loop {
                // SAFETY: null address pointers are allowed by accept(2).
                let c = unsafe { accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
                if c < 0 {
                    continue;
                }
                std::thread::spawn(move || echo(c));
            }
        }
        Some("connect") => {
            let (cid, port, bytes, seed) = (arg(2) as u32, arg(3) as u32, arg(4) as usize, arg(5));
            // SAFETY: socket(2) takes only integers.
            let fd = check(
                unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) },
                "socket",
            );
            let a = addr(cid, port);
            // SAFETY: `a` is a valid sockaddr_vm of the size passed, alive for the call.
            check(
                unsafe { connect(fd, &a, std::mem::size_of::<SockaddrVm>() as u32) },
                "connect",
            );
            let data = pattern(seed, bytes);
            // SAFETY: fd is the connected socket; the writer gets its own descriptor.
            let mut w = unsafe { File::from_raw_fd(fd) };
            let mut r = w.try_clone().expect("dup");
            let expect = data.clone();
            let writer = std::thread::spawn(move || {
                let ok = w.write_all(&data).is_ok();
                // SAFETY: shutdown(2) on the socket still owned by `w`; no memory is passed.
                unsafe { shutdown(fd, SHUT_WR) };
                ok
            });
            let mut back = Vec::with_capacity(bytes);
            let read_ok = r.read_to_end(&mut back).is_ok();
            let wrote = writer.join().unwrap_or(false);
            if wrote && read_ok && back == expect {
                println!("GUEST-CONNECT-OK seed={seed} bytes={}", back.len());
            } else {
                println!(
                    "GUEST-CONNECT-FAIL seed={seed} wrote={wrote} read_ok={read_ok} got={} want={}",
                    back.len(),
                    expect.len()
                );
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: vsock-helper listen <port> | connect <cid> <port> <bytes> <seed>");
            std::process::exit(2);
        }
    }
}
