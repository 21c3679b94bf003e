// docs/protocol.md as the client speaks it, seen on the wire through a recording proxy in
// front of a real server: request ids reused across re-polls and retries, the remaining
// wait in each re-poll, batched renewals, a cancel when the caller gives up, a release in
// `finally`, and a lease counted from the send.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import DistributedLock, { TimeoutError } from 'leasehold';
import { startProxy } from '../test-support/recording-proxy.js';
import { serverForThisFile } from '../test-support/server.js';
import { until, within } from '../test-support/time.js';

// Each long poll ends after this (the server's --max-poll), so a wait shows several re-polls.
const MAX_POLL_MS = 200;
const LEASE_MS = 1500;
const BOUND_MS = 10 * LEASE_MS;

const server = serverForThisFile(['--max-poll', `${MAX_POLL_MS}ms`]);
/** @type {Awaited<ReturnType<typeof startProxy>>} */
let proxy;
/** A client that talks to the server directly, to hold locks and look at them. */
let direct;
before(async () => {
  await server.started;
  proxy = await startProxy(server.url);
  direct = new DistributedLock('protocol-test', { url: server.url });
});
after(() => proxy.close());

const viaProxy = () => new DistributedLock('protocol-test', { url: proxy.url });
const acquiresOf = (/** @type {string} */ name) => proxy.sent('/v1/acquire').filter((e) => e.body.name === name);

test('re-polls reuse the request id and ask for the wait that remains; a 409 needs no cancel', async () => {
  const held = await direct.lock('line');
  const timeout = 6 * MAX_POLL_MS;
  await assert.rejects(viaProxy().acquireLock({ lockName: 'line', timeout, fn: () => 1 }), TimeoutError);
  const polls = acquiresOf('line');
  assert.ok(polls.length >= 3, `${polls.length} polls`);
  assert.equal(new Set(polls.map((p) => p.body.request_id)).size, 1, 'one request id for the whole wait');
  assert.match(polls[0].body.request_id, /^[0-9a-f]{32}$/);
  // Only the id's first send says it is the first (§3.1): re-polls may have a place.
  assert.deepEqual(polls.map((p) => p.body.first), [true, ...polls.slice(1).map(() => undefined)]);
  const waits = polls.map((p) => p.body.wait_ms);
  assert.ok(waits[0] <= timeout);
  waits.slice(1).forEach((wait, i) => assert.ok(wait < waits[i], `wait_ms ${waits.join(', ')}`));
  assert.deepEqual(new Set(polls.map((p) => p.body.lease_ms)), new Set([10_000]));
  assert.deepEqual(polls.slice(0, -1).map((p) => p.status), polls.slice(0, -1).map(() => 202));
  assert.equal(polls.at(-1)?.status, 409);
  assert.equal(proxy.sent('/v1/cancel').filter((e) => e.body.name === 'line').length, 0);
  await held.release();
});

test('a retry after a lost answer reuses the request id and gets the same grant', async () => {
  proxy.loseNextAnswer('/v1/acquire');
  const lock = await within(BOUND_MS, 'the lock', viaProxy().lock('retried'));
  const [first, retry] = acquiresOf('retried');
  assert.equal(first.lost, true);
  assert.equal(first.status, 200, 'the server granted the first attempt');
  assert.equal(retry.body.request_id, first.body.request_id);
  assert.equal(first.body.first, true);
  assert.equal(retry.body.first, undefined, 'a retry never says first');
  assert.equal(retry.answer.lease_id, first.answer.lease_id, 'the same grant, not a second one');
  assert.equal(lock.fencingToken, first.answer.fencing_token);
  const seen = await direct.inspect('retried');
  assert.equal(seen.holder.fencingToken, lock.fencingToken);
  await lock.release();
  assert.equal(await direct.inspect('retried'), null, 'nothing else holds it');
});

test('one renew request carries every lease of the client', async () => {
  const dl = viaProxy();
  const [a, b] = await Promise.all([
    dl.lock('batch-a', { expirationTimeMs: LEASE_MS }),
    dl.lock('batch-b', { expirationTimeMs: LEASE_MS }),
  ]);
  const both = (/** @type {any} */ e) => e.body.leases.length === 2;
  const start = proxy.sent('/v1/renew').length;
  await until(BOUND_MS, 'three renew requests', () => proxy.sent('/v1/renew').length >= start + 3);
  const renewals = proxy.sent('/v1/renew').slice(start);
  // Leases granted a little apart share requests from the first renewal that can take both
  // (one due within a sixth of a lease rides along with the other).
  const firstShared = renewals.findIndex(both);
  assert.ok(firstShared !== -1 && firstShared <= 1, 'the leases share renewals');
  for (const renewal of renewals.slice(firstShared)) {
    assert.deepEqual(renewal.body.leases.map((l) => l.name).sort(), ['batch-a', 'batch-b']);
  }
  await Promise.all([a.release(), b.release()]);
});

test('a caller that gives up sends a cancel with the request id it waited under', async () => {
  const held = await direct.lock('given-up');
  const controller = new AbortController();
  const waiting = viaProxy().lock('given-up', { signal: controller.signal });
  await until(BOUND_MS, 'the waiter to queue', async () => (await direct.inspect('given-up')).waiters === 1);
  controller.abort();
  await assert.rejects(waiting, { name: 'AbortError' });
  const cancel = await within(BOUND_MS, 'the cancel', proxy.answered((e) => e.path === '/v1/cancel' && e.body.name === 'given-up'));
  assert.equal(cancel.body.request_id, acquiresOf('given-up')[0].body.request_id);
  assert.deepEqual(cancel.answer, { cancelled: true });
  assert.equal((await direct.inspect('given-up')).waiters, 0);
  await held.release();
});

test('acquireLock releases in finally, whatever fn did', async () => {
  await assert.rejects(viaProxy().acquireLock({ lockName: 'finally', fn: async () => { throw new Error('boom'); } }), /boom/);
  const [grant] = acquiresOf('finally');
  const [release] = proxy.sent('/v1/release').filter((e) => e.body.name === 'finally');
  assert.equal(release.body.lease_id, grant.answer.lease_id);
  assert.deepEqual(release.answer, { released: true });
});

test('requests go over kept-alive HTTP/1.1 connections', async () => {
  const dl = viaProxy();
  const connectionsBefore = proxy.connections();
  const requestsBefore = proxy.exchanges.length;
  for (let round = 0; round < 5; round++) {
    await dl.acquireLock({ lockName: 'kept-alive', fn: () => round });
  }
  // An acquire and a release each round, one after another: one connection serves them all
  // (one that an earlier test left open, or a new one).
  assert.equal(proxy.exchanges.length - requestsBefore, 10);
  assert.ok(proxy.connections() - connectionsBefore <= 1, `${proxy.connections() - connectionsBefore} connections`);
});

test('the lease is counted from the send: a grant that arrives late is confirmed first', async () => {
  // The request reaches the server late (a slow network): by the client's count, which
  // starts at the send, less than a third of the lease is left when the grant arrives.
  proxy.delayNext('/v1/acquire', (LEASE_MS * 3) / 4);
  const lock = await within(BOUND_MS, 'the lock', viaProxy().lock('late', { expirationTimeMs: LEASE_MS }));
  const [grant] = acquiresOf('late');
  const renewals = proxy.sent('/v1/renew').filter((e) => e.body.leases.some((l) => l.lease_id === grant.answer.lease_id));
  assert.ok(renewals.length >= 1 && renewals[0].status === 200, 'renewed before it was handed over');
  assert.equal(renewals[0].answer.results[0].status, 'renewed');
  assert.equal(lock.isHeld(), true);
  await lock.release();
});
