// How sizes, dates and digests read on the page.
export function bytes(n) {
  if (n == null) return '';
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(1)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

// `secs`: Unix seconds.
export const date = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : '');

export const shortDigest = (d) => (d ? d.slice(0, 12) : '');

export function duration(ms) {
  if (ms == null) return '';
  const s = Math.round(ms / 1000);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}
