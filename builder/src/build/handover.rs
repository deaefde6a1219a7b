//! Network handover: the addresses the build network bound for a VM (DHCP leases, static
//! addresses) handed to its agent, or else a wait for the guest's own DHCP client, so the
//! steps find the network up.

use std::collections::BTreeMap;
use std::time::Duration;

use super::vm::VmBuild;
use crate::events::{Event, EventSink};
use crate::guest::{Connector, Guest, GuestCommand};
use crate::job::{BuildJob, VmJob};
use crate::network as modnet;

/// What the VM's agent is handed: the leases of its DHCP NICs and its static addresses on
/// subnets without DHCP (the agent is all that configures those).
pub(super) fn links(b: &VmBuild) -> Vec<kiln_agent::LinkConfig> {
    let mut links = if uses_dhcp(b.module.job, b.vm) {
        bound_leases(b.module.job, b.vm, b.module.net)
    } else {
        Vec::new()
    };
    links.extend(modnet::static_links(
        &b.module.job.network,
        b.module.net,
        &b.vm.nics,
    ));
    links
}

/// Whether a NIC of `vm` gets its address from the build network's DHCP.
fn uses_dhcp(job: &BuildJob, vm: &VmJob) -> bool {
    vm.nics.iter().any(|n| dhcp_subnet(job, &n.subnet))
}

/// Whether the build network serves DHCP on `subnet`.
fn dhcp_subnet(job: &BuildJob, subnet: &str) -> bool {
    job.network
        .subnets
        .iter()
        .any(|s| s.name == subnet && s.dhcp && !s.unmanaged)
}

/// How long a guest may take to configure its network after its agent answers.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(120);

/// An agent often answers before the guest's DHCP client has configured its NIC; steps that
/// use the network (another VM by name, `httpDirectory`, a package mirror) would race it.
/// This waits until the guest has an IPv4 route other than loopback's (`/proc/net/route`,
/// read with shell builtins only, so any Linux image can run it). A guest that never gets
/// one is warned about, not failed: a step may set the network up itself.
const NETWORK_READY: &str = r#"# Sleep without starting a program each time (a fork and exec costs tens of milliseconds of
# guest CPU under TCG, taken from the boot this waits for): read with a timeout from a FIFO
# nobody writes to.
f=/run/kiln-network-wait.$$
if mkfifo -m 600 "$f" 2>/dev/null; then exec 3<>"$f"; rm -f "$f"; fi
nap() { if [ -e /proc/self/fd/3 ]; then read -r -t 0.2 -u 3 _; else sleep 0.2; fi; }
i=0
while [ $i -lt 600 ]; do
  while read -r iface dest rest; do
    [ "$iface" != Iface ] && [ "$iface" != lo ] && exit 0
  done < /proc/net/route
  nap
  i=$((i+1))
done
exit 1
"#;

/// The leases of `vm`'s DHCP NICs, bound now on the build network, as the agent's
/// `NetConfig` request: the addresses the guest's own DHCP client will get.
fn bound_leases(
    job: &BuildJob,
    vm: &VmJob,
    net: &kiln_net::Network,
) -> Vec<kiln_agent::LinkConfig> {
    vm.nics
        .iter()
        .filter(|n| dhcp_subnet(job, &n.subnet))
        .filter_map(|n| {
            let mac = n.mac.bytes();
            let lease = net.lease(mac).ok()??;
            Some(kiln_agent::LinkConfig {
                mac,
                address: lease.address,
                prefix: lease.prefix,
                gateway: Some(lease.gateway),
                dns: lease.dns,
                search: Vec::new(),
                lease_secs: lease.lease_time.as_secs().min(u64::from(u32::MAX)) as u32,
            })
        })
        .collect()
}

/// Gets the guest's network ready for the steps: hands it the bound leases and static
/// addresses through its agent (on a session of its own: an agent too old for the request
/// closes it), or, when the agent declines or cannot, waits for the guest's own DHCP client
/// (static addresses alone: warns, as nothing else will configure them). Nothing to do
/// without DHCP NICs or static addresses.
pub(super) fn network_up(
    connector: &dyn Connector,
    guest: &mut dyn Guest,
    links: &[kiln_agent::LinkConfig],
    vm: &str,
    ev: &dyn EventSink,
) {
    if links.is_empty() {
        return;
    }
    match crate::launch::hand_over(connector, guest, links) {
        Ok(()) => {
            let addrs: Vec<String> = links
                .iter()
                .map(|l| format!("{}/{}", l.address, l.prefix))
                .collect();
            let how = if links.iter().all(kiln_agent::LinkConfig::is_static) {
                "static"
            } else {
                "its DHCP client takes the same lease over"
            };
            ev.emit(&Event::Note {
                vm: Some(vm.to_string()),
                message: format!("network: {} handed to the guest ({how})", addrs.join(", ")),
            });
        }
        Err(e) if links.iter().all(kiln_agent::LinkConfig::is_static) => {
            let addrs: Vec<String> = links.iter().map(|l| l.address.to_string()).collect();
            ev.emit(&Event::Note {
                vm: Some(vm.to_string()),
                message: format!(
                    "warning: the static address {} could not be configured in the guest ({e}); running the steps anyway",
                    addrs.join(", ")
                ),
            });
        }
        Err(e) => {
            tracing::info!(
                vm,
                "the guest configures its own network ({e}); waiting for it"
            );
            wait_for_network(guest, vm, ev);
        }
    }
}

fn wait_for_network(guest: &mut dyn Guest, vm: &str, ev: &dyn EventSink) {
    let r = guest.exec(
        &GuestCommand::Bash(NETWORK_READY.into()),
        &BTreeMap::new(),
        Some(NETWORK_TIMEOUT),
        &mut |_, _| {},
    );
    let problem = match r {
        Ok(st) if st.success() => return,
        Ok(st) => format!("no IPv4 route after {NETWORK_TIMEOUT:?} ({st})"),
        Err(e) => format!("checking the network: {e}"),
    };
    ev.emit(&Event::Note {
        vm: Some(vm.to_string()),
        message: format!(
            "warning: the guest's network is not configured ({problem}); running the steps anyway"
        ),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::MemorySink;
    use crate::guest::GuestError;
    use crate::provision::tests::{FakeGuest, FakeState};
    use std::sync::{Arc, Mutex};

    /// Sessions whose `net_config` takes the handover (`Ok`) or refuses it.
    struct Handover {
        state: Arc<Mutex<FakeState>>,
        takes: bool,
    }

    /// A session that accepts the handover or not (`.1`) and that knows the request (`.2`:
    /// an agent of protocol 2, which takes it on the main session).
    struct HandoverGuest(FakeGuest, bool, bool);

    impl Guest for HandoverGuest {
        fn exec(
            &mut self,
            cmd: &GuestCommand,
            env: &BTreeMap<String, String>,
            timeout: Option<Duration>,
            out: &mut dyn FnMut(crate::events::Stream, &[u8]),
        ) -> Result<crate::guest::ExecOutcome, GuestError> {
            self.0.exec(cmd, env, timeout, out)
        }
        fn put_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), GuestError> {
            self.0.put_file(path, data, mode)
        }
        fn reboot(&mut self) -> Result<(), GuestError> {
            self.0.reboot()
        }
        fn poweroff(&mut self) -> Result<(), GuestError> {
            self.0.poweroff()
        }
        fn net_config(&mut self, _links: &[kiln_agent::LinkConfig]) -> Result<(), GuestError> {
            if self.1 {
                Ok(())
            } else {
                Err(GuestError::Lost("an old agent closed the session".into()))
            }
        }
        fn takes_net_config(&self) -> bool {
            self.2
        }
    }

    impl Connector for Handover {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            Ok(Box::new(HandoverGuest(
                FakeGuest(self.state.clone()),
                self.takes,
                false,
            )))
        }
    }

    fn link() -> kiln_agent::LinkConfig {
        kiln_agent::LinkConfig {
            mac: [2, 0, 0, 0, 0, 1],
            address: [10, 0, 2, 2].into(),
            prefix: 24,
            gateway: Some([10, 0, 2, 1].into()),
            dns: vec![[10, 0, 2, 1].into()],
            search: vec![],
            lease_secs: 3600,
        }
    }

    /// A connector that must not be used.
    struct NoSessions;

    impl Connector for NoSessions {
        fn connect(&self, _t: Duration) -> Result<Box<dyn Guest>, GuestError> {
            panic!("the handover opened a session although the main one takes it")
        }
    }

    #[test]
    fn an_agent_that_knows_the_request_takes_it_on_the_main_session() {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let ev = MemorySink::default();
        let mut main = HandoverGuest(FakeGuest(state.clone()), true, true);
        network_up(&NoSessions, &mut main, &[link()], "vm", &ev);
        assert_eq!(state.lock().unwrap().commands.len(), 0);
        // It declines (the guest's own stack got there first): the wait, on the same session.
        let mut main = HandoverGuest(FakeGuest(state.clone()), false, true);
        network_up(&NoSessions, &mut main, &[link()], "vm", &ev);
        assert_eq!(state.lock().unwrap().commands.len(), 1);
    }

    /// Runs `network_up`; returns the commands the main session ran and the notes.
    fn up(takes: bool, links: &[kiln_agent::LinkConfig]) -> (usize, Vec<String>) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let conn = Handover {
            state: state.clone(),
            takes,
        };
        let ev = MemorySink::default();
        let mut main = FakeGuest(state.clone());
        network_up(&conn, &mut main, links, "vm", &ev);
        let notes = ev
            .events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Note { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect();
        let n = state.lock().unwrap().commands.len();
        (n, notes)
    }

    #[test]
    fn the_lease_is_handed_over_or_the_guest_dhcp_is_waited_for() {
        // Taken: no wait runs in the guest, and the build says what was handed over.
        let (cmds, notes) = up(true, &[link()]);
        assert_eq!(cmds, 0);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("10.0.2.2/24 handed to the guest")),
            "{notes:?}"
        );
        // Refused (an old agent, or one that declines): the route wait runs instead.
        let (cmds, notes) = up(false, &[link()]);
        assert_eq!(cmds, 1, "the wait for the guest's own DHCP");
        assert!(notes.iter().all(|n| !n.contains("handed")), "{notes:?}");
        // No DHCP NIC: nothing at all.
        assert_eq!(up(false, &[]), (0, vec![]));
    }

    #[test]
    fn a_static_address_is_handed_over_or_warned_about_without_a_wait() {
        let mut s = link();
        s.lease_secs = kiln_agent::STATIC_LEASE;
        let (cmds, notes) = up(true, std::slice::from_ref(&s));
        assert_eq!(cmds, 0);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("10.0.2.2/24 handed to the guest (static)")),
            "{notes:?}"
        );
        // No DHCP client will configure it: no wait, a warning that names the address.
        let (cmds, notes) = up(false, &[s]);
        assert_eq!(cmds, 0, "no wait for a DHCP client");
        assert!(
            notes.iter().any(|n| n.contains("warning")
                && n.contains("static address 10.0.2.2 could not be configured")),
            "{notes:?}"
        );
    }
}
