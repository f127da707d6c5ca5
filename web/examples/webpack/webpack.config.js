// webpack 5 finds the worker (`new Worker(new URL(...))`) and the wasm (`new URL(...)`) itself.
const path = require("node:path");
const fs = require("node:fs");

module.exports = {
  mode: "production",
  entry: "./src/main.js",
  output: { path: path.resolve(__dirname, "dist"), filename: "main.js", clean: true },
  // `npm run dev`: the bundle from memory, index.html from this folder, models from ./public.
  devServer: { static: [__dirname, path.resolve(__dirname, "public")], historyApiFallback: true },
  plugins: [
    {
      apply: (compiler) =>
        compiler.hooks.afterEmit.tap("copy-html", () => {
          if (fs.existsSync(path.resolve(__dirname, "dist"))) fs.copyFileSync(path.resolve(__dirname, "index.html"), path.resolve(__dirname, "dist/index.html"));
        }),
    },
  ],
};
