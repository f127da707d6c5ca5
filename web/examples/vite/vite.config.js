// The dev server's dependency pre-bundling moves kiln-gpu into .vite/deps without its worker.js
// and wasm (Vite cannot follow `new URL(..., import.meta.url)` there): serve it as is. Production
// builds do not need this.
export default { optimizeDeps: { exclude: ["kiln-gpu"] } };
