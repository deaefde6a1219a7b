// Placeholder until the terminal slice lands: it replaces this file with a real terminal
// into `vm` of the running clone `clone`.
export default function Terminal({ clone, vm }) {
  return (
    <div className="terminal-placeholder" data-testid="terminal-placeholder" aria-label={`terminal of ${clone}/${vm}`}>
      terminal: coming
    </div>
  );
}
