// A real `leasehold-server` process per test: a free port, its own temporary state
// directory and state file, so that parallel runs never share a server or its state.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before } from 'node:test';
import { serverBin } from './binaries.js';
import { within } from './time.js';

/** How long a server may take to start listening: a debug build on a busy machine, before
 * any lease exists, so no lease of a test bounds it. */
export const STARTUP_BOUND_MS = 30_000;

/**
 * Starts a server; resolves once it prints its address.
 * @param {string[]} [args] extra command-line arguments
 */
export async function startServer(args = []) {
  const dir = mkdtempSync(join(tmpdir(), 'leasehold-js-test-'));
  const child = spawn(serverBin(), ['--listen', '127.0.0.1:0', '--state-file', join(dir, 'leasehold.state'), ...args], {
    env: { ...process.env, STATE_DIRECTORY: dir, RUST_LOG: 'info' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = [];
  const lines = createInterface({ input: child.stderr });
  const url = await within(STARTUP_BOUND_MS, 'the server to listen', new Promise((resolve, reject) => {
    lines.on('line', (line) => {
      log.push(line);
      const found = line.match(/listening on (\S+)/);
      if (found) resolve(found[1]);
    });
    child.once('exit', (code, signal) => reject(new Error(`leasehold-server exited (${code ?? signal}):\n${log.join('\n')}`)));
    child.once('error', reject);
  }));
  return {
    url,
    pid: /** @type {number} */ (child.pid),
    log,
    /** SIGSTOP: the server stops answering, while its clock goes on. */
    pause: () => child.kill('SIGSTOP'),
    resume: () => child.kill('SIGCONT'),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGCONT');
        child.kill('SIGKILL');
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * One server for the test file: started before its first test, stopped after its last.
 * Read `.url` inside tests; a `before` hook of the file that needs the server awaits
 * `.started` (Node 20 runs a file's top-level `before` hooks at the same time).
 * @param {string[]} [args]
 */
export function serverForThisFile(args = []) {
  /** @type {(value: unknown) => void} */
  let markStarted = () => {};
  /** @type {{url: string, server: Awaited<ReturnType<typeof startServer>> | null, started: Promise<unknown>}} */
  const handle = { url: '', server: null, started: new Promise((resolve) => { markStarted = resolve; }) };
  before(async () => {
    handle.server = await startServer(args);
    handle.url = handle.server.url;
    markStarted(undefined);
  });
  after(() => handle.server?.stop());
  return handle;
}
