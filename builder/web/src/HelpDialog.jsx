import { useEffect, useRef } from 'react';
import './HelpDialog.css';

// The keyboard shortcuts, in a modal <dialog> (Escape closes it; focus returns to the page).
const SHORTCUTS = [
  ['Ctrl+S / ⌘S', 'save the manifest in the editor'],
  ['?', 'this help'],
  ['h', 'home'],
  ['e', 'the open manifest in the editor'],
  ['b', 'the newest build'],
  ['Tab / Shift+Tab', 'move between controls; Enter or Space presses a button'],
  ['Escape', 'close this dialog'],
];

export default function HelpDialog({ open, onClose }) {
  const ref = useRef(null);
  useEffect(() => {
    const d = ref.current;
    if (!d) return;
    if (open && !d.open) d.showModal();
    if (!open && d.open) d.close();
  }, [open]);
  return (
    <dialog ref={ref} className="help-dialog" data-testid="help-dialog" aria-labelledby="help-title" onClose={onClose}>
      <h2 id="help-title">Keyboard shortcuts</h2>
      <p>Single keys work when no field, editor or terminal has the focus.</p>
      <table>
        <tbody>
          {SHORTCUTS.map(([k, what]) => (
            <tr key={k}>
              <th scope="row"><kbd>{k}</kbd></th>
              <td>{what}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <form method="dialog">
        <button type="submit" data-testid="help-close" autoFocus>Close</button>
      </form>
    </dialog>
  );
}
