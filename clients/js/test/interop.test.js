// The Rust SDK and the JS client on one lock, in turn: `leasehold run` (the Rust CLI, which
// holds the lock through the Rust SDK's guard) and acquireLock / lock() of this package.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import DistributedLock from 'leasehold';
import { cliBin } from '../test-support/binaries.js';
import { STARTUP_BOUND_MS, serverForThisFile } from '../test-support/server.js';
import { exited, fileAppears, until, within } from '../test-support/time.js';

const KEY = 'interop-test';
const LEASE_MS = 2000;

const server = serverForThisFile();
let dir = '';
before(() => { dir = mkdtempSync(join(tmpdir(), 'leasehold-js-interop-')); });
after(() => rmSync(dir, { recursive: true, force: true }));

/**
 * `leasehold run NAME [options] -- bash -c SCRIPT`, with the key in the environment (never
 * in argv, where other users could read it).
 * @param {string} name
 * @param {string[]} options
 * @param {string} script
 */
function cliRun(name, options, script) {
  return spawn(cliBin(), ['run', name, '--expires-in', `${LEASE_MS}ms`, '--kill-after', `${LEASE_MS / 4}ms`, ...options, '--', 'bash', '-c', script], {
    env: { ...process.env, LEASEHOLD_URL: server.url, LEASEHOLD_API_KEY: KEY },
    stdio: ['pipe', 'ignore', 'inherit'],
  });
}

/** A command that reports its fencing token in `file`, then holds on until its stdin closes. */
const reportTokenThenWait = (file) => `echo "$LEASEHOLD_FENCING_TOKEN" > ${file}.tmp && mv ${file}.tmp ${file} && { read -r _ || true; }`;

test('a Rust holder, then a JS acquireLock waiting in line behind it', async () => {
  const tokenFile = join(dir, 'rust-first');
  const rust = cliRun('interop-1', [], reportTokenThenWait(tokenFile));
  await fileAppears(STARTUP_BOUND_MS, tokenFile);
  const rustToken = Number(readFileSync(tokenFile, 'utf8'));

  const dl = new DistributedLock(KEY, { url: server.url });
  let rustToldToEnd = null;
  const js = dl.acquireLock({
    lockName: 'interop-1',
    fn: async ({ fencingToken }) => {
      // The Rust side releases only after its command ended, which needs its stdin closed.
      rustToldToEnd = rust.stdin.writableEnded;
      return fencingToken;
    },
  });
  await until(10 * LEASE_MS, 'the JS client to wait in line', async () => (await dl.inspect('interop-1')).waiters === 1);
  const holder = (await dl.inspect('interop-1')).holder;
  assert.equal(holder.fencingToken, rustToken, 'the Rust side still holds it');

  rust.stdin.end();
  const jsToken = await within(10 * LEASE_MS, 'the JS side to get the lock', js);
  assert.equal(rustToldToEnd, true, 'the JS side got the lock only after the Rust command was told to end');
  assert.ok(jsToken > rustToken, `JS token ${jsToken} after Rust token ${rustToken}`);
  assert.equal(await within(10 * LEASE_MS, 'the CLI to exit', exited(rust)), 0);
});

test('a JS holder, then a Rust run waiting in line behind it', async () => {
  const dl = new DistributedLock(KEY, { url: server.url });
  const js = await dl.lock('interop-2', { label: 'js-holder' });

  // `--timeout 0` finds it taken: exit 75, the command never runs.
  const refused = cliRun('interop-2', ['--timeout', '0'], `touch ${join(dir, 'must-not-run')}`);
  assert.equal(await within(STARTUP_BOUND_MS, 'the refused CLI to exit', exited(refused)), 75);

  const tokenFile = join(dir, 'js-first');
  const rust = cliRun('interop-2', [], reportTokenThenWait(tokenFile));
  await until(STARTUP_BOUND_MS, 'the Rust side to wait in line', async () => (await dl.inspect('interop-2')).waiters === 1);
  await js.release();
  await fileAppears(10 * LEASE_MS, tokenFile);
  const rustToken = Number(readFileSync(tokenFile, 'utf8'));
  assert.ok(rustToken > js.fencingToken, `Rust token ${rustToken} after JS token ${js.fencingToken}`);
  rust.stdin.end();
  assert.equal(await within(10 * LEASE_MS, 'the CLI to exit', exited(rust)), 0);
  assert.throws(() => readFileSync(join(dir, 'must-not-run')), /ENOENT/);
});
