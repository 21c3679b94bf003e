// The client: `acquireLock` (the original library's closure style), `lock` (guard style)
// and `inspect`, over one transport and one renewer shared by all of them.

import { waitInLine } from './acquire.js';
import { now } from './clock.js';
import { InvalidArgumentError, LockLostError, TimeoutError } from './errors.js';
import { Lease, marginFor } from './lease.js';
import { Lock } from './lock.js';
import {
  MAX_LEASE_MS, checkApiKey, checkEndpoints, checkLockOptions, checkMs, checkName, describeType,
} from './options.js';
import { inspectionPath, toLockInfo } from './inspection.js';
import { Renewer } from './renewer.js';
import { Transport, errorFromReply } from './transport.js';

/** Endpoint used when neither the `url` option nor $LEASEHOLD_URL names one. */
export const DEFAULT_URL = 'http://127.0.0.1:7878';
/** Without a timeout, give up on unreachable servers after this long (§5.1). */
const DEFAULT_UNAVAILABLE_AFTER_MS = 30_000;
/** Longest wait for one inspection answer. */
const INSPECT_ATTEMPT_MS = 5_000;

export default class DistributedLock {
  #transport;
  #renewer;
  #safetyMarginMs;
  #unavailableAfterMs;

  /**
   * @param {string} apiKey the project's API key
   * @param {{url?: string, safetyMarginMs?: number, unavailableAfterMs?: number}} [options]
   */
  constructor(apiKey, options = {}) {
    if (options === null || typeof options !== 'object') {
      throw new InvalidArgumentError(`options must be an object, got ${describeType(options)}`);
    }
    const { url = process.env.LEASEHOLD_URL || DEFAULT_URL, safetyMarginMs, unavailableAfterMs } = options;
    this.#transport = new Transport(checkEndpoints(url), checkApiKey(apiKey));
    this.#renewer = new Renewer(this.#transport);
    this.#safetyMarginMs = safetyMarginMs === undefined ? null : checkMs(safetyMarginMs, 'safetyMarginMs');
    this.#unavailableAfterMs = unavailableAfterMs === undefined
      ? DEFAULT_UNAVAILABLE_AFTER_MS
      : checkMs(unavailableAfterMs, 'unavailableAfterMs', { min: 1 });
  }

  /**
   * Takes the lock `lockName`, runs `fn` while holding it (renewing the lease), releases it
   * and resolves with what `fn` returned.
   * @template T
   * @param {{lockName: string, fn: (held: {signal: AbortSignal, fencingToken: number}) => T | Promise<T>,
   *   expirationTimeMs?: number, timeout?: number, label?: string, signal?: AbortSignal}} options
   * @returns {Promise<T>}
   */
  async acquireLock(options) {
    if (options === null || typeof options !== 'object') {
      throw new InvalidArgumentError(`acquireLock takes an options object, got ${describeType(options)}`);
    }
    const { lockName, fn } = options;
    checkName(lockName, 'lockName');
    if (typeof fn !== 'function') {
      throw new InvalidArgumentError(`fn must be a function, got ${describeType(fn)}`);
    }
    const lock = await this.lock(lockName, options);
    let value;
    try {
      value = await whileHeld(lock, fn);
    } catch (error) {
      // The lock goes back at once however `fn` ended; its own error is the one to see.
      await lock.release().catch(() => {});
      throw error;
    }
    try {
      await lock.release();
    } catch (error) {
      // Gone at release: it may have been someone else's before `fn` finished.
      if (error instanceof LockLostError) throw error;
      // Otherwise `fn` finished while the lock was held; the lease expires by itself.
    }
    return value;
  }

  /**
   * Waits for the lock `name` and resolves with a held Lock; call `release()` when done.
   * @param {string} name
   * @param {{expirationTimeMs?: number, timeout?: number, label?: string, signal?: AbortSignal}} [options]
   * @returns {Promise<Lock>}
   */
  async lock(name, options) {
    checkName(name, 'lock name');
    const { leaseMs, timeoutMs, label, signal } = checkLockOptions(options);
    signal?.throwIfAborted();
    const started = now();
    const waitDeadline = timeoutMs === null ? null : started + timeoutMs;
    for (;;) {
      const grant = await waitInLine(this.#transport, {
        name, leaseMs, waitDeadline, started, label, signal, unavailableAfterMs: this.#unavailableAfterMs,
      });
      // A server's figures are checked, not trusted: no lease beyond the protocol's longest.
      const lengthMs = Math.min(grant.lengthMs, MAX_LEASE_MS);
      const lease = new Lease({
        name,
        leaseId: grant.leaseId,
        fencingToken: grant.fencingToken,
        lengthMs,
        marginMs: marginFor(lengthMs, this.#safetyMarginMs),
        started: grant.started,
      });
      const lock = new Lock(lease, this.#renewer, this.#transport);
      if (lease.deadline - now() >= lengthMs / 3) {
        this.#renewer.track(lease);
        return lock;
      }
      // The grant arrived with little of its lease left (a busy event loop, a slow network):
      // confirm it with a renewal first, or give it back and wait again within the timeout.
      if (await this.#renewer.confirm(lease)) {
        return lock;
      }
      lock.release().catch(() => {});
      if (waitDeadline !== null && now() >= waitDeadline) {
        throw new TimeoutError({ lockName: name, waitedMs: now() - started, holder: null });
      }
    }
  }

  /**
   * Who holds the lock `name` and how many wait for it; null if nobody holds or waits for it.
   * @param {string} name
   * @returns {Promise<import('./inspection.js').LockInfo | null>}
   */
  async inspect(name) {
    checkName(name, 'lock name');
    const reply = await this.#transport.get(inspectionPath(name), {
      deadline: now() + this.#unavailableAfterMs,
      perAttemptMs: INSPECT_ATTEMPT_MS,
    });
    if (reply.status === 404 && reply.body?.error === 'not_found') return null;
    if (reply.status !== 200) throw errorFromReply(reply);
    return toLockInfo(reply.body);
  }
}

/**
 * Runs `fn` while the lock is held; rejects with LockLostError as soon as the lease is lost
 * (`fn` is told through its signal, since a promise cannot be stopped from outside).
 * @template T
 * @param {Lock} lock
 * @param {(held: {signal: AbortSignal, fencingToken: number}) => T | Promise<T>} fn
 * @returns {Promise<T>}
 */
async function whileHeld(lock, fn) {
  const { signal, fencingToken } = lock;
  /** @type {() => void} */
  let onAbort = () => {};
  const lost = new Promise((_, reject) => {
    onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  const work = Promise.resolve().then(() => fn({ signal, fencingToken }));
  // Once the loss is reported, a later rejection of `fn` has no one to report to.
  work.catch(() => {});
  try {
    const value = await Promise.race([work, lost]);
    // The deadline timer may lag the clock on a busy event loop: held means held now.
    if (!lock.isHeld()) {
      throw signal.reason instanceof LockLostError ? signal.reason : new LockLostError(lock.name);
    }
    return value;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}
