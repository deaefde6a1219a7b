// How the build page writes times and sizes.
export const secs = (ms) => (ms == null ? '' : `${(ms / 1000).toFixed(1)} s`);
export const mib = (b) => `${(b / (1 << 20)).toFixed(1)} MiB`;
export const gib = (b) => `${(b / (1 << 30)).toFixed(1)} GiB`;
export const size = (b) => (b < 1024 ? `${b} B` : b < 1 << 20 ? `${(b / 1024).toFixed(1)} KiB` : mib(b));
