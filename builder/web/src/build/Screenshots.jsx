import * as api from '../api.js';
import './Screenshots.css';

// The screens kiln saved while it typed a VM's boot command (`<vm>-boot-NN.png`), in order.
export default function Screenshots({ id, vm, files }) {
  const re = new RegExp(`^${vm.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}-boot-(\\d+)\\.png$`);
  const shots = files.filter((f) => re.test(f.name));
  if (!shots.length) return null;
  return (
    <figure className="screenshots" data-testid={`screenshots-${vm}`}>
      <figcaption>Boot command: the screen as kiln typed</figcaption>
      <ol>
        {shots.map((f, i) => (
          <li key={f.name}>
            <a href={api.buildLogUrl(id, f.name)} target="_blank" rel="noreferrer">
              <img src={api.buildLogUrl(id, f.name)} alt={`${vm}: boot-command screen ${i + 1} of ${shots.length}`}
                data-testid={`screenshot-${f.name}`} />
            </a>
          </li>
        ))}
      </ol>
    </figure>
  );
}
