// A lease lost while held: the server stops answering (SIGSTOP) for longer than the lease.
// The holder must hear of it through its signal, and acquireLock must reject with
// LockLostError, never resolve as if the lock had been held throughout.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import DistributedLock, { LockLostError } from 'leasehold';
import { startServer } from '../test-support/server.js';
import { within } from '../test-support/time.js';

const LEASE_MS = 2000;
// Renewals stop reaching the server; the client gives up at its local deadline, less than
// one lease after its last renewal was sent. The rest is slack for a busy machine.
const LOSS_BOUND_MS = 4 * LEASE_MS;

test('acquireLock: a lost lease aborts fn and rejects with LockLostError', async () => {
  const server = await startServer();
  try {
    const dl = new DistributedLock('lost-lease-test', { url: server.url });
    let fnStarted;
    const started = new Promise((resolve) => { fnStarted = resolve; });
    let stoppedAt = Infinity;
    let abortedAt = -Infinity;
    let abortReason = null;
    let holderToken = 0;
    const result = dl.acquireLock({
      lockName: 'lost',
      expirationTimeMs: LEASE_MS,
      fn: async ({ signal, fencingToken }) => {
        holderToken = fencingToken;
        fnStarted();
        // Work that only ends when told the lock is gone.
        await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
        abortedAt = performance.now();
        abortReason = signal.reason;
        return 'finished as if held';
      },
    });
    await within(LOSS_BOUND_MS, 'fn to start', started);
    server.pause();
    stoppedAt = performance.now();
    await within(LOSS_BOUND_MS, 'acquireLock to reject', assert.rejects(result, (error) => {
      assert.ok(error instanceof LockLostError, `${error}`);
      assert.equal(error.name, 'LockLostError');
      assert.equal(error.lockName, 'lost');
      return true;
    }));
    assert.ok(abortedAt > stoppedAt, 'fn was told only after the server stopped');
    assert.ok(abortReason instanceof LockLostError, 'the signal carries the LockLostError');
    server.resume();

    // The server, back, has expired the lease (its clock went on): the lock moves on, under
    // a greater fencing token.
    const next = await within(LOSS_BOUND_MS, 'the lock to be granted again', dl.lock('lost', { expirationTimeMs: LEASE_MS }));
    assert.ok(next.fencingToken > holderToken);
    await next.release();
  } finally {
    await server.stop();
  }
});

test('lock(): the guard\'s signal fires, isHeld() turns false, release() rejects', async () => {
  const server = await startServer();
  try {
    const dl = new DistributedLock('lost-lease-test', { url: server.url });
    const lock = await dl.lock('lost-guard', { expirationTimeMs: LEASE_MS });
    assert.equal(lock.isHeld(), true);
    const aborted = new Promise((resolve) => lock.signal.addEventListener('abort', resolve, { once: true }));
    server.pause();
    await within(LOSS_BOUND_MS, 'the guard\'s signal', aborted);
    assert.equal(lock.isHeld(), false);
    assert.ok(lock.signal.reason instanceof LockLostError);
    server.resume();
    await assert.rejects(lock.release(), LockLostError);
  } finally {
    await server.stop();
  }
});

test('acquireLock: a revoked lease aborts fn and says it was revoked', async () => {
  const server = await startServer();
  try {
    const key = 'revoke-test';
    const dl = new DistributedLock(key, { url: server.url });
    let fnStarted;
    const started = new Promise((resolve) => { fnStarted = resolve; });
    const result = dl.acquireLock({
      lockName: 'revoked',
      expirationTimeMs: LEASE_MS,
      fn: async ({ signal }) => {
        fnStarted();
        await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
        return 'finished as if held';
      },
    });
    await within(LOSS_BOUND_MS, 'fn to start', started);
    // An operator revokes it (docs/protocol.md: POST /v1/revoke).
    const answer = await fetch(`${server.url}/v1/revoke`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'revoked' }),
    });
    assert.equal(answer.status, 200);
    // The holder hears it on its next renewal, a third into the lease.
    await within(LOSS_BOUND_MS, 'acquireLock to reject', assert.rejects(result, (error) => {
      assert.ok(error instanceof LockLostError, `${error}`);
      assert.equal(error.reason, 'revoked');
      assert.match(error.message, /revoked/);
      return true;
    }));
  } finally {
    await server.stop();
  }
});
