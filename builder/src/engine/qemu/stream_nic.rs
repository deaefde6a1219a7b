//! An emulated NIC (`e1000`, `e1000e`) under the qemu engine: QEMU's `-netdev stream` connects
//! to a kiln-net [`StreamListener`], and a relay thread moves frames between that connection
//! and the NIC's switch port.
//!
//! The switch port (and with it the MAC, the DHCP lease and the DNS name) belongs to the VM,
//! not to one QEMU: QEMU 7.2's stream netdev cannot reconnect, and a guest reboot starts a
//! fresh QEMU that connects again, so the relay accepts every new connection on the same
//! socket and carries on with the same port. While no QEMU is connected, frames for the guest
//! are dropped, as on an unplugged cable.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use kiln_net::stream::{StreamListener, StreamPort};
use kiln_net::{FramePort, PortError, MAX_FRAME};

use crate::engine::{EngineError, NicAttach};

/// Frames moved per direction before the other direction gets a turn.
const BATCH: usize = 64;

/// How often the relay wakes without traffic: a frame the kernel took only part of is
/// finished by the port's next `recv`, which this bounds.
const TICK_MS: i32 = 100;

/// One emulated NIC's socket and its relay thread; stopped when dropped.
pub struct StreamNic {
    /// Dropping it makes the relay's end readable: the stop signal.
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl StreamNic {
    /// Listens on `socket` (replacing a stale file) for NIC `nic`'s QEMU and starts the relay.
    /// The socket is bound when this returns, so QEMU can be started next.
    pub fn start(socket: &Path, nic: &NicAttach) -> Result<StreamNic, EngineError> {
        let _ = std::fs::remove_file(socket);
        let listener = StreamListener::bind(socket).map_err(|e| {
            EngineError::Backend(format!("stream socket for NIC {}: {e}", nic.name))
        })?;
        let (stop, stop_rx) = UnixStream::pair().map_err(|source| EngineError::Spawn {
            what: "a relay stop socket".into(),
            source,
        })?;
        let port = nic.port.clone();
        let name = nic.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-qemu-nic-{name}"))
            .spawn(move || relay(&name, &listener, &*port, &stop_rx))
            .map_err(|source| EngineError::Spawn {
                what: format!("the relay thread of NIC {}", nic.name),
                source,
            })?;
        Ok(StreamNic {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the relay and waits for it; the socket file is removed.
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StreamNic {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn relay(name: &str, listener: &StreamListener, net: &dyn FramePort, stop: &UnixStream) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut qemu: Option<StreamPort> = None;
    loop {
        let mut fds = [
            pollfd(stop.as_raw_fd()),
            pollfd(listener.as_raw_fd()),
            pollfd(net.rx_fd()),
            // A negative fd is ignored by poll: no QEMU connected.
            pollfd(qemu.as_ref().map_or(-1, |q| q.rx_fd())),
        ];
        // SAFETY: four valid pollfds in a live array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK_MS) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(nic = name, "stream relay poll: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            match listener.try_accept() {
                // A new connection is a new QEMU (the guest rebooted): the old one is gone.
                Ok(Some(port)) => {
                    tracing::debug!(nic = name, "QEMU connected to the NIC's stream socket");
                    qemu = Some(port);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(nic = name, "accepting QEMU's stream connection: {e}"),
            }
        }
        // Called on every turn, not only when readable: it also finishes a half-sent frame.
        if let Some(q) = &qemu {
            if !from_qemu(name, q, net, &mut buf) {
                qemu = None;
            }
        }
        if fds[2].revents != 0 {
            for _ in 0..BATCH {
                match net.recv(&mut buf) {
                    Ok(Some(len)) => {
                        if let Some(q) = &qemu {
                            if let Err(e) = q.send(&buf[..len]) {
                                tracing::debug!(nic = name, "to QEMU: {e}");
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(PortError::TooLarge(n)) => {
                        tracing::debug!(nic = name, "dropped a {n}-byte frame for the VM")
                    }
                    Err(e) => {
                        // The switch is gone (the build is ending): nothing can cross any more.
                        tracing::debug!(nic = name, "switch side of the NIC: {e}");
                        return;
                    }
                }
            }
        }
    }
}

/// Moves what QEMU sent to the switch; false when the connection is finished (QEMU exited,
/// or broke the framing) and the next QEMU's connection is awaited.
fn from_qemu(name: &str, q: &StreamPort, net: &dyn FramePort, buf: &mut [u8]) -> bool {
    for _ in 0..BATCH {
        match q.recv(buf) {
            Ok(Some(len)) => {
                if let Err(e) = net.send(&buf[..len]) {
                    tracing::debug!(nic = name, "to the network: {e}");
                }
            }
            Ok(None) => return true,
            Err(PortError::TooLarge(n)) => {
                tracing::debug!(nic = name, "dropped a {n}-byte frame from the VM")
            }
            Err(e) => {
                tracing::debug!(nic = name, "QEMU's stream connection ended: {e}");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests;
