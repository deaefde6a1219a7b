import { Text } from './Fields.jsx';
import { useForm } from './context.js';

// The module's name (envelope manifests) and the build's bounds.
export default function BuildSettings() {
  const { base } = useForm();
  return (
    <section className="form-section" aria-labelledby="form-build">
      <h2 id="form-build">Build</h2>
      <div className="row">
        {base.length > 0 && <Text label="module name" path={['metadata', 'name']} />}
        <Text label="timeout" path={[...base, 'timeout']} placeholder="30m" />
        <Text label="retries" numeric path={[...base, 'retries']} placeholder="0" />
        <Text label="ISO cache TTL" path={[...base, 'isoCacheTTL']} placeholder="24h" />
      </div>
    </section>
  );
}
