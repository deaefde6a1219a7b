import { Text, Select } from './Fields.jsx';

// How the build reaches the guest: kiln's agent (default) or the guest's own sshd.
export default function Communicator({ p, vm }) {
  const cp = [...p, 'communicator'];
  const c = vm.communicator && typeof vm.communicator === 'object' ? vm.communicator : {};
  // The SSH fields matter with type ssh; they stay visible when the YAML sets them anyway.
  const ssh = c.type === 'ssh' || ['sshUsername', 'sshPassword', 'sshPort', 'sshPrivateKeySecret'].some((k) => k in c);
  return (
    <div className="row">
      <Select label="type" path={[...cp, 'type']} options={['agent', 'ssh']} allowEmpty />
      <Select label="shell" path={[...cp, 'shell']} options={['bash', 'sh', 'powershell', 'cmd']} allowEmpty />
      <Text label="timeout (agent or sshd)" path={[...cp, 'sshTimeout']} placeholder="5m" />
      {ssh && (
        <>
          <Text label="SSH user" path={[...cp, 'sshUsername']} placeholder="root" />
          <Text label="SSH password" path={[...cp, 'sshPassword']} />
          <Text label="SSH port" numeric path={[...cp, 'sshPort']} placeholder="22" />
          <Text label="SSH private key file" path={[...cp, 'sshPrivateKeySecret', 'name']} />
        </>
      )}
    </div>
  );
}
