// The server's refusals as the error classes a caller branches on: a refused key, a limit
// reached, a name or lease the server rejects.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import DistributedLock, {
  DistributedLockError, InvalidArgumentError, LimitReachedError, UnauthorizedError,
} from 'leasehold';
import { serverBin } from '../test-support/binaries.js';
import { startServer } from '../test-support/server.js';
import { until } from '../test-support/time.js';

/** A project key made by the server's own `new-key`, and the key file line for it. */
function newKey() {
  const printed = execFileSync(serverBin(), ['new-key', '--project', 'demo'], { encoding: 'utf8' });
  return {
    key: /** @type {string} */ (printed.match(/dlk_\S+/)?.[0]),
    entry: /** @type {string} */ (printed.match(/\{ id = .*\}/)?.[0]),
  };
}

const { key, entry } = newKey();
let dir = '';
/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'leasehold-js-errors-'));
  const keyFile = join(dir, 'keys.toml');
  writeFileSync(keyFile, `[[projects]]\nname = "demo"\nmax_waiters_per_lock = 1\nkeys = [\n  ${entry},\n]\n`);
  server = await startServer(['--key-file', keyFile]);
});
after(async () => {
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('a refused key: UnauthorizedError, without the key in it', async () => {
  const wrong = `${key.slice(0, -4)}0000`;
  const dl = new DistributedLock(wrong, { url: server.url });
  const error = await dl.acquireLock({ lockName: 'a', fn: () => 1 }).catch((e) => e);
  assert.ok(error instanceof UnauthorizedError && error instanceof DistributedLockError, `${error}`);
  assert.equal(error.name, 'UnauthorizedError');
  assert.ok(!error.message.includes(wrong) && !String(error.stack).includes(wrong));
});

test('a full line: LimitReachedError with the server\'s Retry-After', async () => {
  const dl = new DistributedLock(key, { url: server.url });
  const held = await dl.lock('crowded');
  const waiter = dl.lock('crowded');
  // Within the holder's default 10 s lease: the waiter queues behind it, never gets it.
  await until(10_000, 'the one allowed waiter to queue', async () => (await dl.inspect('crowded')).waiters === 1);
  const error = await dl.lock('crowded').catch((e) => e);
  assert.ok(error instanceof LimitReachedError, `${error}`);
  assert.ok(Number.isInteger(error.retryAfterMs) && error.retryAfterMs >= 0, `retryAfterMs ${error.retryAfterMs}`);
  await held.release();
  await (await waiter).release();
});

test('names and leases the server refuses: InvalidArgumentError with its reason', async () => {
  const dl = new DistributedLock(key, { url: server.url });
  await assert.rejects(dl.lock('zero\u200Bwidth'), (e) => e instanceof InvalidArgumentError && /U\+200B/.test(e.message));
  // Within the protocol's bound, beyond this server's (1 h by default).
  await assert.rejects(dl.lock('long', { expirationTimeMs: 2 * 3_600_000 }), InvalidArgumentError);
});
