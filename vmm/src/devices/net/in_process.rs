//! virtio-net on kiln's own transport ([`crate::transport`], the `kvm` engine): the same
//! [`NetHandler`] as the vhost-user backend, on a [`QueueWorker`] that waits on the two kick
//! eventfds and on the frame port's rx fd (edge-triggered, as in the vhost-user backend).

use std::sync::Arc;

use kiln_net::FramePort;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::device::{NetDeviceConfig, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
use super::handler::NetHandler;
use crate::transport::{
    read_config_bytes, ActivateContext, ActivateError, DeviceQueue, ExtraFd, QueueHandler,
    QueueWorker, VirtioDevice,
};

/// The [`ExtraFd`] id of the frame port.
const PORT: u64 = 0;

/// A virtio-net device for the in-process transport.
pub struct VirtioNet {
    config: NetDeviceConfig,
    port: Arc<dyn FramePort>,
    worker: Option<QueueWorker>,
}

impl VirtioNet {
    pub fn new(port: Arc<dyn FramePort>, mac: [u8; 6]) -> VirtioNet {
        VirtioNet {
            config: NetDeviceConfig::new(mac),
            port,
            worker: None,
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
        // Dropping a worker stops and joins its thread.
        self.worker = None;
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
        let queues = NetQueues {
            handler,
            port: self.port.clone(),
            // Frames may have queued in the port before the driver was ready.
            pending: [true, false],
            broken: [false; 2],
        };
        // In index order, so a queue's index is its position in the worker's queues.
        let worker =
            QueueWorker::spawn("kiln-net-dev", queues, ctx.mem, vec![rx, tx], ctx.interrupt)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

/// [`NetHandler`] as the worker runs it: kicks and port events only mark a queue pending;
/// the pending queues are served once per wake-up, tx before rx, so what the guest sent
/// goes out before we look for answers.
struct NetQueues {
    handler: NetHandler,
    port: Arc<dyn FramePort>,
    /// By queue index: served at the end of this wake-up.
    pending: [bool; 2],
    /// By queue index: a queue whose ring lied stays unused until the driver resets.
    broken: [bool; 2],
}

impl QueueHandler for NetQueues {
    fn extra_fds(&self) -> Vec<ExtraFd> {
        vec![ExtraFd {
            fd: self.port.rx_fd(),
            events: EventSet::IN | EventSet::EDGE_TRIGGERED,
            id: PORT,
        }]
    }

    fn process_queue(&mut self, index: u16, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
        let index = usize::from(index);
        if let Some(p) = self.pending.get_mut(index) {
            *p = true;
        }
        if index == TX_QUEUE {
            // Replies often come back in the same turn.
            self.pending[RX_QUEUE] = true;
        }
        false
    }

    fn handle_event(&mut self, _id: u64, _mem: &GuestMemoryMmap) -> bool {
        self.pending[RX_QUEUE] = true;
        false
    }

    fn events_done(&mut self, queues: &mut [DeviceQueue], mem: &GuestMemoryMmap) -> bool {
        let mut notify = false;
        for index in [TX_QUEUE, RX_QUEUE] {
            if !std::mem::take(&mut self.pending[index]) || self.broken[index] {
                continue;
            }
            let q = &mut queues[index].queue;
            let r = if index == RX_QUEUE {
                self.handler.process_rx(q, mem)
            } else {
                self.handler.process_tx(q, mem)
            };
            match r {
                Ok(n) => notify |= n,
                Err(e) => {
                    tracing::error!(queue = index, "virtio-net: queue stopped until reset: {e}");
                    self.broken[index] = true;
                }
            }
        }
        notify
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Interrupt;
    use kiln_net::port_pair;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

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
