// `kiln serve` processes for the Node end-to-end tests: started on a free port, their output
// collected in `log`, all killed when the tests end.
import { spawn } from "node:child_process";

export class KilnServers {
  /** `bin`: the kiln binary; `env`: its environment. */
  constructor(bin, env) {
    this.bin = bin;
    this.env = env;
    this.log = "";
    this.procs = [];
  }

  /**
   * Starts `kiln serve --port 0 ...args`; resolves to its base URL. A server whose /health is
   * not Kiln's (something else answering, "403 resolve_deny") is replaced by one on another port.
   */
  async start(args) {
    for (let attempt = 1; ; attempt++) {
      const base = await this.#spawn(args);
      const h = await fetch(`${base}/health`).then((r) => r.text(), (e) => String(e));
      if (h.includes('"status":"ok"')) return base;
      this.log += `[${base}/health answered ${JSON.stringify(h.slice(0, 100))}: not kiln; trying another port]\n`;
      this.procs.pop().kill("SIGKILL");
      if (attempt === 3) throw new Error(`kiln serve is not reachable on its port:\n${this.log}`);
    }
  }

  #spawn(args) {
    const server = spawn(this.bin, ["serve", "--port", "0", ...args], { env: this.env });
    this.procs.push(server);
    let own = "";
    server.stdout.on("data", (d) => (this.log += d));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`kiln serve did not start:\n${own}`)), 120_000);
      server.stderr.on("data", (d) => {
        this.log += d;
        own += d;
        // The whole line: stderr can arrive in pieces ("...http://127" then ".0.0.1:4000").
        const m = /listening on (http:\/\/\S+)\r?\n/.exec(own);
        if (m) clearTimeout(timer), resolve(m[1]);
      });
      server.on("exit", (code, signal) => {
        this.log += `[kiln serve exited: code ${code}, signal ${signal}]\n`;
        reject(new Error(`kiln serve exited (${code}):\n${own}`));
      });
    });
  }

  /** Kills every server. */
  killAll(signal = "SIGKILL") {
    for (const s of this.procs) s.kill(signal);
  }
}
