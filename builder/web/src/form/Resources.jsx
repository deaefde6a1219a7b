import { Text, Select } from './Fields.jsx';
import List from './List.jsx';

// vCPUs, memory and the VM's disks (the first is the boot disk; default one 20Gi disk).
export default function Resources({ p, idx }) {
  return (
    <>
      <div className="row">
        <Text label="cpu" numeric path={[...p, 'resources', 'cpu']} placeholder="1" />
        <Text label="memory" path={[...p, 'resources', 'memory']} placeholder="1Gi" />
      </div>
      <List title="disks (default: one 20Gi disk)" testid={`disks-${idx}`} path={[...p, 'disks']}
        itemName={(d, i) => d?.name || `disk ${i + 1}`}
        adds={[{ label: '+ Disk', testid: `disks-${idx}-add`, make: (xs) => ({ name: xs.length ? `data${xs.length}` : 'root', size: '20Gi' }) }]}
        render={(dp) => (
          <div className="row">
            <Text label="name" path={[...dp, 'name']} />
            <Text label="size" path={[...dp, 'size']} placeholder="20Gi" />
            <Select label="bus" path={[...dp, 'bus']} options={['virtio', 'scsi', 'sata']} allowEmpty />
          </div>
        )} />
    </>
  );
}
