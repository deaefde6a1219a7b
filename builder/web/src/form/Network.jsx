import { getIn, setIn, pathKey } from '../doc.js';
import { useForm } from './context.js';
import { Text, Check, Select } from './Fields.jsx';
import List from './List.jsx';

// The module's network: VPCs (internet through NAT: none, build only, always) and subnets
// (managed with DHCP, or unmanaged).
export default function Network() {
  const { doc, set, base } = useForm();
  const net = [...base, 'network'];
  const ovPath = [...base, 'buildOverrides', 'vpcs'];
  const vpcs = getIn(doc, [...net, 'vpcs']) || [];
  // "Build only": internet off in the base, on in a build override.
  const internetMode = (v) => {
    if (v?.internet === true) return 'always';
    const ov = (getIn(doc, ovPath) || []).find((o) => o?.name === v?.name);
    return ov?.internet === true ? 'build' : 'none';
  };
  const setInternet = (p, v, mode) => {
    let d = setIn(doc, [...p, 'internet'], mode === 'always');
    let ov = (getIn(d, ovPath) || []).filter((o) => o?.name !== v?.name);
    if (mode === 'build') ov = [...ov, { name: v?.name, internet: true }];
    d = setIn(d, ovPath, ov.length ? ov : undefined);
    const overrides = getIn(d, [...base, 'buildOverrides']);
    if (!ov.length && overrides && Object.keys(overrides).length === 0) d = setIn(d, [...base, 'buildOverrides'], undefined);
    set([], d);
  };
  return (
    <section className="form-section" aria-labelledby="form-network">
      <h2 id="form-network">Network</h2>
      <p className="section-note">Without VPCs and subnets a module has one VPC with internet and one DHCP subnet, <code>10.0.2.0/24</code>.</p>
      <List title="VPCs" testid="vpcs" path={[...net, 'vpcs']} itemName={(v, i) => v?.name || `VPC ${i + 1}`}
        adds={[{ label: '+ VPC', testid: 'vpcs-add', make: (xs) => ({ name: `vpc${xs.length + 1}`, internet: false }) }]}
        render={(p, v) => (
          <div className="row">
            <Text label="name" path={[...p, 'name']} />
            <label className="field"><span className="label">Internet (NAT)</span>
              <select data-path={pathKey([...p, 'internet'])} value={internetMode(v)} onChange={(e) => setInternet(p, v, e.target.value)}>
                <option value="none">None</option><option value="build">Build only</option><option value="always">Always</option>
              </select>
            </label>
            <Check label="host access" path={[...p, 'hostAccess']} />
          </div>
        )} />
      <List title="subnets" testid="subnets" path={[...net, 'subnets']} itemName={(s, i) => s?.name || `subnet ${i + 1}`}
        adds={[{ label: '+ Subnet', testid: 'subnets-add', make: (xs) => ({ name: `subnet${xs.length + 1}`, cidr: `10.0.${xs.length + 1}.0/24` }) }]}
        render={(p, s) => (
          <div className="row">
            <Text label="name" path={[...p, 'name']} />
            <Select label="VPC" path={[...p, 'vpc']} options={vpcs.map((v) => v?.name).filter(Boolean)} allowEmpty />
            <label className="field"><span className="label">mode</span>
              <select data-path={pathKey([...p, 'unmanaged'])} value={s?.unmanaged === true ? 'unmanaged' : 'managed'}
                onChange={(e) => set([...p, 'unmanaged'], e.target.value === 'unmanaged' ? true : undefined)}>
                <option value="managed">Managed</option><option value="unmanaged">Unmanaged</option>
              </select>
            </label>
            <Text label="CIDR" path={[...p, 'cidr']} />
            <Check label="DHCP" path={[...p, 'dhcp']} dflt />
            <Text label="DNS" path={[...p, 'dns']} placeholder="8.8.8.8,1.1.1.1" />
          </div>
        )} />
    </section>
  );
}
