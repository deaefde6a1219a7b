// The YAML tab: a CodeMirror 6 editor (highlighting, line numbers, undo, search, indenting
// with spaces), the validator's diagnostics underlined and marked in the gutter as you type,
// completion and hover help from the manifest's JSON Schema, and the diagnostics listed below
// (each jumps to its place).
import { useEffect, useRef } from 'react';
import { EditorView, basicSetup } from 'codemirror';
import { Annotation, EditorSelection, EditorState, Prec } from '@codemirror/state';
import { hoverTooltip, keymap } from '@codemirror/view';
import { indentWithTab } from '@codemirror/commands';
import { acceptCompletion, completionStatus } from '@codemirror/autocomplete';
import { indentUnit } from '@codemirror/language';
import { yaml } from '@codemirror/lang-yaml';
import { lintGutter, setDiagnostics } from '@codemirror/lint';
import * as api from './api.js';
import { completionSource, hoverSource } from './yaml/help.js';
import { message, toCodeMirror } from './yaml/lint.js';
import './YamlEditor.css';

// Marks the editor's own updates from new `text` props, which are not user edits.
const fromProps = Annotation.define();

export default function YamlEditor({ text, diags, onChange, name }) {
  const host = useRef(null);
  const view = useRef(null);
  const schema = useRef(null);
  const onChangeRef = useRef(onChange);
  onChangeRef.current = onChange;

  useEffect(() => {
    // One source for the editor's life: a new one on each lookup would restart completion.
    const complete = completionSource(schema);
    const v = new EditorView({
      parent: host.current,
      state: EditorState.create({
        doc: text,
        extensions: [
          basicSetup,
          // Tab accepts an open completion (and does nothing else while one is open, even in
          // the moment after it opens when CodeMirror does not take it yet), else indents.
          Prec.high(keymap.of([{ key: 'Tab', run: (v) => acceptCompletion(v) || completionStatus(v.state) === 'active' }])),
          keymap.of([indentWithTab]),
          indentUnit.of('  '),
          EditorState.tabSize.of(2),
          yaml(),
          lintGutter(),
          EditorState.languageData.of(() => [{ autocomplete: complete }]),
          hoverTooltip(hoverSource(schema), { hoverTime: 300 }),
          EditorView.contentAttributes.of({ 'aria-label': 'Manifest YAML', 'data-testid': 'yaml' }),
          EditorView.updateListener.of((u) => {
            if (u.docChanged && !u.transactions.some((t) => t.annotation(fromProps))) {
              onChangeRef.current(u.state.doc.toString());
            }
          }),
        ],
      }),
    });
    view.current = v;
    let live = true;
    api.schema().then((s) => { if (live) schema.current = s; }, () => {});
    return () => {
      live = false;
      v.destroy();
      view.current = null;
    };
    // The editor is made once; later texts arrive through the effect below.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, []);

  // A text from outside (a manifest opened, the Visual tab's edits) replaces the editor's.
  useEffect(() => {
    const v = view.current;
    if (!v) return;
    const cur = v.state.doc.toString();
    if (cur === text) return;
    const head = Math.min(v.state.selection.main.head, text.length);
    v.dispatch({
      changes: { from: 0, to: cur.length, insert: text },
      selection: EditorSelection.cursor(head),
      annotations: fromProps.of(true),
    });
  }, [text]);

  // Diagnostics are for the text they were checked against; stale ones are dropped.
  useEffect(() => {
    const v = view.current;
    if (!v) return;
    const ds = v.state.doc.toString() === text ? toCodeMirror(v.state.doc, name, diags) : [];
    v.dispatch(setDiagnostics(v.state, ds));
  }, [diags, text, name]);

  const jump = (d) => {
    const v = view.current;
    if (!v) return;
    const [cm] = toCodeMirror(v.state.doc, name, [d]);
    v.dispatch({ selection: EditorSelection.cursor(cm.from), scrollIntoView: true });
    v.focus();
  };

  return (
    <div className="yaml">
      <div className="yaml-editor" data-testid="yaml-editor" ref={host} />
      {diags.length > 0 && (
        <ul className="diags" data-testid="yaml-diags" aria-label="Diagnostics">
          {diags.map((d, i) => (
            <li key={i} className={d.severity} data-line={d.line}>
              <button type="button" className="diag-jump" onClick={() => jump(d)} title="go to this place">
                {message(name, d)}
              </button>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
