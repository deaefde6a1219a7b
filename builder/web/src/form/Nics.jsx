import { Text, Select } from './Fields.jsx';
import List from './List.jsx';

// The VM's network interfaces (default: one NIC on the first subnet). A new NIC takes the
// lowest free slot and the first subnet.
export default function Nics({ p, vm, idx, subnets }) {
  const nics = Array.isArray(vm.nics) ? vm.nics : [];
  const used = new Set(nics.map((n) => n?.slot).filter((s) => s != null));
  const free = [1, 2, 3, 4, 5, 6, 7, 8, 9].find((s) => !used.has(s));
  return (
    <List title="interfaces (default: one NIC on the first subnet)" testid={`nics-${idx}`} path={[...p, 'nics']}
      itemName={(n, i) => n?.name || `NIC ${i + 1}`}
      adds={[{ label: '+ NIC', testid: `nics-${idx}-add`, disabled: free == null, make: () => ({ name: `nic${free}`, subnet: subnets[0] || '', slot: free }) }]}
      render={(np) => (
        <div className="row">
          <Text label="name" path={[...np, 'name']} />
          <Select label="subnet" path={[...np, 'subnet']} options={subnets} />
          <Text label="slot" numeric path={[...np, 'slot']} />
          <Text label="IP" path={[...np, 'ip']} />
          <Text label="MAC" path={[...np, 'mac']} />
          <Select label="model" path={[...np, 'model']} options={['virtio', 'e1000', 'e1000e']} allowEmpty />
        </div>
      )} />
  );
}
