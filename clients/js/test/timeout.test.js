// A wait that runs out names who holds the lock: the holder's label and fencing token.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import DistributedLock, { TimeoutError } from 'leasehold';
import { serverForThisFile } from '../test-support/server.js';
import { within } from '../test-support/time.js';

const TIMEOUT_MS = 400;
// The server ends the wait at the timeout; the rest is slack for a busy machine.
const BOUND_MS = 20 * TIMEOUT_MS;

const server = serverForThisFile();

test('TimeoutError names the holder\'s label and fencing token', async () => {
  const holderClient = new DistributedLock('timeout-test', { url: server.url });
  const waiter = new DistributedLock('timeout-test', { url: server.url });
  const held = await holderClient.lock('busy', { label: 'host-a/job-42' });
  const started = performance.now();
  const error = await within(BOUND_MS, 'the timeout', waiter.acquireLock({ lockName: 'busy', timeout: TIMEOUT_MS, fn: () => 'ran' }).catch((e) => e));
  assert.ok(error instanceof TimeoutError, `${error}`);
  assert.equal(error.holder, 'host-a/job-42');
  assert.equal(error.fencingToken, held.fencingToken);
  assert.equal(error.lockName, 'busy');
  assert.ok(error.waitedMs >= TIMEOUT_MS && performance.now() - started >= TIMEOUT_MS);
  assert.match(error.message, /"busy".*held by "host-a\/job-42", fencing token \d+/);
  // The waiter left the line: nobody waits for the lock now.
  assert.equal((await waiter.inspect('busy')).waiters, 0);
  await held.release();
});

test('timeout: 0 tries once; a holder without a label is named by its token', async () => {
  const dl = new DistributedLock('timeout-test', { url: server.url });
  const held = await dl.lock('busy-unlabelled');
  const error = await within(BOUND_MS, 'the refusal', dl.lock('busy-unlabelled', { timeout: 0 }).catch((e) => e));
  assert.ok(error instanceof TimeoutError);
  assert.equal(error.holder, null);
  assert.equal(error.fencingToken, held.fencingToken);
  await held.release();
});
