import { createRoot } from 'react-dom/client';
import App from './App.jsx';
import Terminal from './Terminal.jsx';
import './app.css';

// `#/terminal/<clone>/<vm>`: a terminal alone (the browser tests' way in, beside the module page).
const term = window.location.hash.match(/^#\/terminal\/([^/]+)\/([^/]+)$/);
createRoot(document.getElementById('root')).render(term
  ? <Terminal clone={decodeURIComponent(term[1])} vm={decodeURIComponent(term[2])} />
  : <App />);
