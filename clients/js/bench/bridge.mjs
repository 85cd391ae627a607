// How fast one backend process pushes answer text into Herald through
// herald-gateway/server, and what it costs that process: RUNS answers of
// DELTAS deltas each, all at once, through the AI SDK bridge (`run.pipe` of
// a UI message stream, the UI chunk ingest) or through `run.text` (the text
// ingest). Reports deltas/s and this process's CPU per delta
// (process.cpuUsage); the deltas are produced as fast as they are taken.
//
//   HERALD_URL=http://127.0.0.1:8080 HERALD_API_KEY=… node bench/bridge.mjs [pipe|text] RUNS DELTAS
import { Herald } from '../server.js';

const [mode = 'pipe', runs = '20', deltas = '5000'] = process.argv.slice(2);
const RUNS = Number(runs);
const DELTAS = Number(deltas);
const herald = new Herald({ url: process.env.HERALD_URL ?? 'http://127.0.0.1:8080', apiKey: process.env.HERALD_API_KEY });
const tag = Date.now().toString(36);

/** A UI message stream of DELTAS text deltas (what toUIMessageStream() writes), made as it is read. */
function uiStream() {
  let i = -1;
  return new ReadableStream({
    pull(c) {
      if (i === -1) c.enqueue({ type: 'start' });
      else if (i < DELTAS) c.enqueue({ type: 'text-delta', id: 't', delta: `w${i} ` });
      else { c.enqueue({ type: 'finish' }); c.close(); }
      i += 1;
    },
  }, { highWaterMark: 64 });
}

async function one(n) {
  await herald.run(`bridge-${tag}-${n}`, { threadId: 'c' }, async (run) => {
    if (mode === 'pipe') {
      const answer = await run.pipe(uiStream());
      if (answer.appended !== DELTAS + 2) throw new Error(`appended ${answer.appended}`);
    } else {
      for (let i = 0; i < DELTAS; i++) run.text(`w${i} `);
      await run.flush();
    }
  });
}

const cpu0 = process.cpuUsage();
const t0 = performance.now();
await Promise.all(Array.from({ length: RUNS }, (_, n) => one(n)));
const secs = (performance.now() - t0) / 1000;
const cpu = process.cpuUsage(cpu0);
const total = RUNS * DELTAS;
const cpuUs = (cpu.user + cpu.system) / total;
console.log(JSON.stringify({
  mode, runs: RUNS, deltas_per_run: DELTAS, seconds: Number(secs.toFixed(2)),
  deltas_per_second: Math.round(total / secs), backend_cpu_us_per_delta: Number(cpuUs.toFixed(2)),
}));
