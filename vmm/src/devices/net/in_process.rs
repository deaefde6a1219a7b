//! virtio-net on kiln's own transport ([`crate::transport`], the `kvm` engine): the same
//! [`NetHandler`] as the vhost-user backend, on a worker thread that waits on the two kick
//! eventfds and on the frame port's rx fd (edge-triggered, as in the vhost-user backend).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_net::FramePort;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetDeviceConfig, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use super::handler::NetHandler;
use crate::transport::{
    read_config_bytes, ActivateContext, ActivateError, DeviceQueue, Interrupt, VirtioDevice,
};

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;

const STOP: u64 = u64::MAX;
const PORT: u64 = u64::MAX - 1;

/// A virtio-net device for the in-process transport.
pub struct VirtioNet {
    config: NetDeviceConfig,
    port: Arc<dyn FramePort>,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl VirtioNet {
    pub fn new(port: Arc<dyn FramePort>, mac: [u8; 6]) -> VirtioNet {
        VirtioNet {
            config: NetDeviceConfig::new(mac),
            port,
            worker: None,
        }
    }

    fn stop_worker(&mut self) {
        if let Some((stop, thread)) = self.worker.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.config.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let mut rx = None;
        let mut tx = None;
        for q in ctx.queues {
            match usize::from(q.index) {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                i => {
                    return Err(ActivateError::BadQueues(format!(
                        "no queue {i} on virtio-net"
                    )))
                }
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::BadQueues(
                "virtio-net needs its rx and tx queues".into(),
            ));
        };
        let mut handler = NetHandler::new(self.port.clone());
        handler.set_acked_features(ctx.acked_features);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let add = |fd, ev, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token));
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        add(rx.kick.as_raw_fd(), EventSet::IN, RX_QUEUE as u64)?;
        add(tx.kick.as_raw_fd(), EventSet::IN, TX_QUEUE as u64)?;
        add(
            self.port.rx_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            PORT,
        )?;
        let stop2 = stop.try_clone()?;
        let (mem, interrupt) = (ctx.mem, ctx.interrupt);
        let thread = std::thread::Builder::new()
            .name("kiln-net-dev".into())
            .spawn(move || run(epoll, stop2, handler, [rx, tx], mem, interrupt))?;
        self.worker = Some((stop, thread));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn run(
    epoll: Epoll,
    stop: EventFd,
    mut handler: NetHandler,
    mut queues: [DeviceQueue; 2],
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
) {
    let mut broken = [false; 2];
    let mut events = vec![EpollEvent::default(); 4];
    // Frames may have queued in the port before the driver was ready.
    let mut pending = vec![RX_QUEUE];
    loop {
        for index in pending.drain(..) {
            if broken[index] {
                continue;
            }
            let q = &mut queues[index].queue;
            let r = if index == RX_QUEUE {
                handler.process_rx(q, &mem)
            } else {
                handler.process_tx(q, &mem)
            };
            match r {
                Ok(true) => {
                    if let Err(e) = interrupt.signal_used_queue() {
                        tracing::warn!("virtio-net: raising the interrupt: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(queue = index, "virtio-net: queue stopped until reset: {e}");
                    broken[index] = true;
                }
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-net worker epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => {
                    let _ = stop.read();
                    return;
                }
                PORT => pending.push(RX_QUEUE),
                t => {
                    let index = t as usize;
                    if let Some(q) = queues.get(index) {
                        let _ = q.kick.read();
                        pending.push(index);
                        if index == TX_QUEUE {
                            // Replies often come back in the same turn.
                            pending.push(RX_QUEUE);
                        }
                    }
                }
            }
        }
        pending.sort_unstable();
        pending.dedup();
        // tx before rx: what the guest sent goes out before we look for answers.
        pending.reverse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_net::port_pair;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn frames_flow_both_ways_through_the_worker() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        rxq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x10_0000, 2048, 2, 0,
            ))],
            0,
        )
        .unwrap();
        let (dev_end, net_end) = port_pair(16).unwrap();
        let mut dev = VirtioNet::new(Arc::new(dev_end), [2, 0, 0, 0, 0, 1]);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_kick2 = tx_kick.try_clone().unwrap();
        dev.activate(ActivateContext {
            mem: m.clone(),
            acked_features: dev.features(),
            queues: vec![
                DeviceQueue {
                    index: 0,
                    queue: rxq.create_queue::<Queue>().unwrap(),
                    kick: rx_kick,
                },
                DeviceQueue {
                    index: 1,
                    queue: txq.create_queue::<Queue>().unwrap(),
                    kick: tx_kick,
                },
            ],
            interrupt: interrupt.clone(),
        })
        .unwrap();

        // Network -> guest.
        net_end.send(&[7u8; 80]).unwrap();
        let used_idx = |q: &MockSplitQueue<GuestMemoryMmap<()>>| -> u16 {
            m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
        };
        wait_until("the rx buffer to be used", || used_idx(&rxq) == 1);
        let mut f = [0u8; 80];
        m.read_slice(&mut f, GuestAddress(0x10_000c)).unwrap();
        assert_eq!(f, [7u8; 80]);
        assert_ne!(interrupt.status() & crate::transport::INT_VRING, 0);

        // Guest -> network.
        let mut chain = vec![0u8; 12];
        chain.extend_from_slice(&[9u8; 64]);
        m.write_slice(&chain, GuestAddress(0x20_0000)).unwrap();
        txq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x20_0000, 76, 0, 0,
            ))],
            0,
        )
        .unwrap();
        tx_kick2.write(1).unwrap();
        let mut buf = [0u8; 2048];
        wait_until("the frame on the port", || {
            matches!(net_end.recv(&mut buf), Ok(Some(64)))
        });
        assert_eq!(&buf[..64], &[9u8; 64]);
        dev.reset();
    }
}
