import './ProblemList.css';

// The manifest's problems above the form: a count, a button to the first error (the first
// thing the keyboard reaches in the form), and every diagnostic as a link to its field.
export default function ProblemList({ diags, goTo }) {
  if (!diags.length) return null;
  const errors = diags.filter((d) => d.severity === 'error');
  const first = errors[0] || diags[0];
  return (
    <div className={`problem-list${errors.length ? '' : ' warnings-only'}`} role="region" aria-label="problems" data-testid="problem-list">
      <div className="problem-head">
        <strong>{errors.length} error{errors.length === 1 ? '' : 's'}, {diags.length - errors.length} warning{diags.length - errors.length === 1 ? '' : 's'}</strong>
        <button type="button" data-testid="first-error" onClick={() => goTo(first)}>
          Go to the first {errors.length ? 'error' : 'warning'}
        </button>
      </div>
      <ul>
        {diags.map((d, i) => (
          <li key={i} className={d.severity}>
            <button type="button" className="link" data-testid={`problem-${i}`} onClick={() => goTo(d)}>
              {d.line}:{d.column}
            </button>{' '}
            {d.message}
          </li>
        ))}
      </ul>
    </div>
  );
}
