import { gib, mib } from './format.js';

// The module a build made: where it is, how it was built, its disks.
export default function ModuleResult({ result }) {
  const r = result.record;
  return (
    <div className="module" data-testid="build-module">
      <h3>Module <code data-testid="build-module-name">{r.name}</code></h3>
      <p>At <code data-testid="build-module-dir">{result.dir}</code>, built by kiln {r.kilnVersion} on
        the {r.engine} engine in {r.buildSeconds.toFixed(0)} s.
        Use it with <code>kiln clone {r.name}</code> or as a <code>buildRef</code> source.</p>
      <table className="matrix">
        <thead><tr><th>VM</th><th>CPUs</th><th>memory</th><th>disk</th><th>size</th><th>file</th><th>sha256</th></tr></thead>
        <tbody>
          {r.vms.flatMap((vm) => vm.disks.map((d, i) => (
            <tr key={`${vm.name}-${d.name}`} data-testid={`module-disk-${vm.name}-${d.name}`}>
              <td>{i === 0 ? vm.name : ''}</td><td>{i === 0 ? vm.cpus : ''}</td>
              <td>{i === 0 ? `${vm.memoryMib} MiB` : ''}</td>
              <td><code>{d.file}</code></td><td>{gib(d.virtualSize)}</td><td>{mib(d.fileSize)}</td>
              <td><code title={d.sha256}>{d.sha256.slice(0, 12)}…</code></td>
            </tr>
          )))}
        </tbody>
      </table>
    </div>
  );
}
