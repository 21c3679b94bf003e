// Code written as the original library's README shows runs unchanged (but for the import):
// its three call shapes, plus the input checks and the release in `finally`.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import DistributedLock, { DistributedLockError, InvalidArgumentError, TimeoutError } from 'leasehold';
import { serverForThisFile } from '../test-support/server.js';

describe('the original README, unchanged', () => {
  const server = serverForThisFile();
  // The README's code takes the endpoint from the environment, as its users' code will.
  before(async () => {
    await server.started;
    process.env.LEASEHOLD_URL = server.url;
  });

  test('plain: fn runs holding the lock, its value comes back, the lock is free after', async () => {
    const dl = new DistributedLock('your-project-api-key');
    const observer = new DistributedLock('your-project-api-key');
    let seenHolder = null;
    const result = await dl.acquireLock({
      lockName: 'my-lock',
      fn: async () => {
        seenHolder = await observer.inspect('my-lock');
        return 10;
      },
    });
    assert.equal(result, 10);
    assert.ok(seenHolder?.holder, 'the lock was held while fn ran');
    // Default lease: 10 s, as in the original.
    assert.ok(seenHolder.holder.expiresInMs <= 10_000 && seenHolder.holder.expiresInMs > 5_000, `${seenHolder.holder.expiresInMs}`);
    assert.equal(await observer.inspect('my-lock'), null, 'released once fn is done');
  });

  test('expirationTimeMs: the lease is as long as asked', async () => {
    const dl = new DistributedLock('your-project-api-key');
    let seen = null;
    const result = await dl.acquireLock({
      lockName: 'my-lock',
      expirationTimeMs: 20000,
      fn: async () => {
        seen = await dl.inspect('my-lock');
        return 10;
      },
    });
    assert.equal(result, 10);
    assert.ok(seen.holder.expiresInMs > 10_000 && seen.holder.expiresInMs <= 20_000, `${seen.holder.expiresInMs}`);
  });

  test('timeout: a free lock is taken at once; a held one gives up with TimeoutError', async () => {
    const dl = new DistributedLock('your-project-api-key');
    assert.equal(await dl.acquireLock({ lockName: 'my-lock', timeout: 5000, fn: async () => 10 }), 10);

    const holder = await dl.lock('my-lock');
    const started = performance.now();
    let ran = false;
    await assert.rejects(
      dl.acquireLock({ lockName: 'my-lock', timeout: 500, fn: async () => { ran = true; return 10; } }),
      (error) => error instanceof TimeoutError && error instanceof DistributedLockError && error.name === 'TimeoutError',
    );
    assert.ok(performance.now() - started >= 500, 'waited the whole timeout');
    assert.equal(ran, false, 'fn never ran');
    await holder.release();
  });

  test('fn that throws: its error comes back and the lock is released (finally)', async () => {
    const dl = new DistributedLock('your-project-api-key');
    const failure = new Error('thinking failed');
    await assert.rejects(dl.acquireLock({ lockName: 'my-lock', fn: async () => { throw failure; } }), (e) => e === failure);
    assert.equal(await dl.inspect('my-lock'), null);
    // A synchronous throw too.
    await assert.rejects(dl.acquireLock({ lockName: 'my-lock', fn: () => { throw failure; } }), (e) => e === failure);
    assert.equal(await dl.inspect('my-lock'), null);
  });

  test('fn gets the fencing token and a live signal', async () => {
    const dl = new DistributedLock('your-project-api-key');
    let seen = null;
    const token = await dl.acquireLock({
      lockName: 'my-lock',
      fn: async ({ signal, fencingToken }) => {
        seen = await dl.inspect('my-lock');
        assert.equal(signal.aborted, false);
        return fencingToken;
      },
    });
    assert.equal(token, seen.holder.fencingToken);
  });
});

describe('bad input fails at once, naming what is wrong', () => {
  const dl = new DistributedLock('key', { url: 'http://127.0.0.1:1' });
  const cases = [
    [{ fn: async () => 1 }, /lockName must be a string/],
    [{ lockName: '', fn: async () => 1 }, /lockName is empty/],
    [{ lockName: 'x'.repeat(257), fn: async () => 1 }, /257 bytes/],
    [{ lockName: 'a' }, /fn must be a function, got undefined/],
    [{ lockName: 'a', fn: 'nope' }, /fn must be a function, got string/],
    [{ lockName: 'a', fn: async () => 1, expirationTimeMs: -1 }, /expirationTimeMs is -1/],
    [{ lockName: 'a', fn: async () => 1, expirationTimeMs: 0 }, /expirationTimeMs is 0/],
    [{ lockName: 'a', fn: async () => 1, expirationTimeMs: '20000' }, /expirationTimeMs must be a number/],
    [{ lockName: 'a', fn: async () => 1, timeout: -5 }, /timeout is -5/],
    [{ lockName: 'a', fn: async () => 1, timeout: NaN }, /timeout must be a number/],
    [{ lockName: 'a', fn: async () => 1, label: 7 }, /label must be a string/],
    [undefined, /takes an options object/],
  ];
  for (const [options, message] of cases) {
    test(`acquireLock(${JSON.stringify(options)?.slice(0, 60)})`, async () => {
      await assert.rejects(dl.acquireLock(options), (e) => e instanceof InvalidArgumentError && message.test(e.message));
    });
  }

  test('constructor: empty key, bad URL', () => {
    assert.throws(() => new DistributedLock(''), /API key is empty/);
    assert.throws(() => new DistributedLock(undefined), /API key must be a string/);
    assert.throws(() => new DistributedLock('k', { url: 'ftp://x' }), /http:\/\/ or https:\/\//);
    assert.throws(() => new DistributedLock('k', { url: 'http://x/path' }), /without path/);
  });

  test('the API key never appears in an error', async () => {
    const secret = 'dlk_secret_value_123';
    const unreachable = new DistributedLock(secret, { url: 'http://127.0.0.1:1', unavailableAfterMs: 50 });
    const error = await unreachable.acquireLock({ lockName: 'a', fn: () => 1 }).catch((e) => e);
    assert.equal(error.name, 'UnavailableError');
    assert.ok(!JSON.stringify({ message: error.message, stack: error.stack, cause: String(error.cause) }).includes(secret));
  });
});
