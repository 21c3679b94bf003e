// The guard style: `const lock = await dl.lock(name, opts)`, renewed while held.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import DistributedLock, { Lock } from 'leasehold';
import { serverForThisFile } from '../test-support/server.js';
import { until, within } from '../test-support/time.js';

const LEASE_MS = 600;

const server = serverForThisFile();

test('a guard holds its lease past its length by renewing it', async () => {
  const dl = new DistributedLock('guard-test', { url: server.url });
  const observer = new DistributedLock('guard-test', { url: server.url });
  const lock = await dl.lock('renewed', { expirationTimeMs: LEASE_MS });
  assert.ok(lock instanceof Lock);
  assert.equal(lock.name, 'renewed');
  // Renewals (every third of the lease) push the server's expiry on: wait until it has
  // moved three leases past the grant, still under the same grant.
  await until(20 * LEASE_MS, 'three leases of renewals', async () => {
    const { holder } = await observer.inspect('renewed');
    assert.equal(holder.fencingToken, lock.fencingToken);
    return holder.expiresAtMs - holder.acquiredAtMs > 3 * LEASE_MS;
  });
  assert.equal(lock.isHeld(), true);
  assert.equal(lock.signal.aborted, false);
  await lock.release();
  assert.equal(lock.isHeld(), false);
  assert.equal(lock.signal.aborted, false, 'a release is not a loss');
  assert.equal(await observer.inspect('renewed'), null);
  // A second release is the first one's promise, not an error.
  await lock.release();
});

test('a release hands the lock to the next in line at once, with a greater token', async () => {
  const dl = new DistributedLock('guard-test', { url: server.url });
  const first = await dl.lock('handover');
  const second = dl.lock('handover');
  await until(20 * LEASE_MS, 'the second to wait in line', async () => (await dl.inspect('handover')).waiters === 1);
  await first.release();
  // Far sooner than the first's default 10 s lease would have expired.
  const next = await within(10_000 / 2, 'the handover', second);
  assert.ok(next.fencingToken > first.fencingToken);
  await next.release();
});

test('an aborted wait rejects with the signal\'s reason and leaves the line', async () => {
  const dl = new DistributedLock('guard-test', { url: server.url });
  const held = await dl.lock('abandoned');
  const controller = new AbortController();
  const waiting = dl.lock('abandoned', { signal: controller.signal });
  await until(20 * LEASE_MS, 'the waiter to queue', async () => (await dl.inspect('abandoned')).waiters === 1);
  const reason = new Error('caller gave up');
  controller.abort(reason);
  await assert.rejects(waiting, (e) => e === reason);
  // It left the line (protocol.test.js checks that a cancel did it, not the grace period).
  await until(20 * LEASE_MS, 'the waiter to leave', async () => (await dl.inspect('abandoned')).waiters === 0);
  await held.release();
});

test('Symbol.asyncDispose releases (for `await using`)', async () => {
  const dl = new DistributedLock('guard-test', { url: server.url });
  const lock = await dl.lock('disposed');
  await lock[Symbol.asyncDispose]();
  assert.equal(lock.isHeld(), false);
  assert.equal(await dl.inspect('disposed'), null);
});
