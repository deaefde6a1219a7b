import { useState } from 'react';
import { useField } from './context.js';
import { ItemProblems } from './Fields.jsx';
import './List.css';

// Move the item at `from` to `to` (a new array).
export function moved(items, from, to) {
  const next = items.slice();
  const [it] = next.splice(from, 1);
  next.splice(to, 0, it);
  return next;
}

// A list of items at `path`: each with up/down/remove buttons (and, when `draggable`, a drag
// handle: the buttons are the keyboard's way to reorder). `adds` are the add buttons:
// [{label, testid, make(items)}]. The list key is removed when its last item goes.
export default function List({ title, path, testid, render, adds, draggable, itemName = (_, i) => `item ${i + 1}` }) {
  const { value, set } = useField(path);
  const items = Array.isArray(value) ? value : [];
  const [drag, setDrag] = useState(null);
  const [over, setOver] = useState(null);
  const move = (i, j) => set(moved(items, i, j));
  const drop = (i) => {
    if (drag != null && drag !== i) move(drag, i);
    setDrag(null);
    setOver(null);
  };
  return (
    <fieldset className="list" data-testid={testid}>
      <legend>{title}</legend>
      <ItemProblems path={path} />
      {items.map((item, i) => {
        const name = itemName(item, i);
        return (
          <div
            className={`item${drag === i ? ' dragging' : ''}${over === i && drag !== i ? ' drop-here' : ''}`}
            key={i}
            data-testid={`${testid}-${i}`}
            onDragOver={draggable ? (e) => { if (drag != null) { e.preventDefault(); setOver(i); } } : undefined}
            onDragLeave={draggable ? () => setOver((o) => (o === i ? null : o)) : undefined}
            onDrop={draggable ? (e) => { e.preventDefault(); drop(i); } : undefined}
          >
            <div className="item-tools">
              {draggable && (
                <span className="drag-handle" draggable data-testid={`${testid}-${i}-drag`} title="drag to reorder"
                  aria-hidden="true"
                  onDragStart={(e) => { setDrag(i); e.dataTransfer.effectAllowed = 'move'; e.dataTransfer.setData('text/plain', String(i)); }}
                  onDragEnd={() => { setDrag(null); setOver(null); }}>⠿</span>
              )}
              <button type="button" aria-label={`move ${name} up`} title="move up" data-testid={`${testid}-${i}-up`}
                disabled={i === 0} onClick={() => move(i, i - 1)}>↑</button>
              <button type="button" aria-label={`move ${name} down`} title="move down" data-testid={`${testid}-${i}-down`}
                disabled={i === items.length - 1} onClick={() => move(i, i + 1)}>↓</button>
              <button type="button" aria-label={`remove ${name}`} title="remove" data-testid={`${testid}-${i}-remove`}
                onClick={() => set(items.length === 1 ? undefined : items.filter((_, j) => j !== i))}>✕</button>
            </div>
            <ItemProblems path={[...path, i]} />
            {render([...path, i], item, i)}
          </div>
        );
      })}
      <div className="list-adds">
        {adds.map((a) => (
          <button type="button" key={a.testid} data-testid={a.testid} disabled={a.disabled}
            onClick={() => set([...items, a.make(items)])}>{a.label}</button>
        ))}
      </div>
    </fieldset>
  );
}
