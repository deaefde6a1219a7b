import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// Fixed output names: the kiln binary embeds dist/index.html and dist/app.js by name.
export default defineConfig({
  plugins: [react()],
  base: './',
  build: {
    outDir: 'dist',
    assetsDir: '',
    cssCodeSplit: false,
    rollupOptions: {
      output: {
        entryFileNames: 'app.js',
        chunkFileNames: 'app-[name].js',
        assetFileNames: 'app[extname]',
      },
    },
  },
});
