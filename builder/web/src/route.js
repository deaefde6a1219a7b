// Hash routes: `#/` home, `#/edit/<manifest>`, `#/builds/<id>`, `#/modules/<name>`. The
// hash keeps the page's `?token=` query untouched, and a reload lands on the same view.
import { useEffect, useState } from 'react';

export function parseRoute(hash) {
  const m = (hash || '').replace(/^#/, '').match(/^\/(edit|builds|modules)\/(.+)$/);
  if (!m) return { view: 'home', arg: '' };
  let arg = m[2];
  try {
    arg = decodeURIComponent(arg);
  } catch {
    // A malformed escape: keep the text as typed.
  }
  return { view: m[1], arg };
}

export const href = (view, arg) => (view === 'home' ? '#/' : `#/${view}/${encodeURIComponent(arg)}`);

export function go(view, arg) {
  window.location.hash = href(view, arg);
}

export function useRoute() {
  const [route, setRoute] = useState(() => parseRoute(window.location.hash));
  useEffect(() => {
    const on = () => setRoute(parseRoute(window.location.hash));
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}
