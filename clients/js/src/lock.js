// The guard style: a held lock, renewed in the background until `release()`.

import { now } from './clock.js';
import { LockLostError } from './errors.js';
import { errorFromReply } from './transport.js';

/** Longest wait for one release answer. */
const RELEASE_ATTEMPT_MS = 5_000;

export class Lock {
  #lease;
  #renewer;
  #transport;
  /** @type {Promise<void> | null} */
  #releasing = null;

  /**
   * @param {import('./lease.js').Lease} lease
   * @param {import('./renewer.js').Renewer} renewer
   * @param {import('./transport.js').Transport} transport
   */
  constructor(lease, renewer, transport) {
    this.#lease = lease;
    this.#renewer = renewer;
    this.#transport = transport;
  }

  /** The lock's name. */
  get name() {
    return this.#lease.name;
  }

  /** Greater than the token of every earlier grant of this lock: pass it to what you protect. */
  get fencingToken() {
    return this.#lease.fencingToken;
  }

  /** Aborts (with a LockLostError as its reason) if the lease is lost while held. */
  get signal() {
    return this.#lease.signal;
  }

  /** True while the lease is held: not lost, not released, and its local deadline not passed. */
  isHeld() {
    return !this.#lease.done && this.#lease.isHeld();
  }

  /**
   * Releases the lock so the next waiter gets it at once. Rejects with LockLostError if the
   * lease was lost before (another party may have held the lock since). Calling it again
   * returns the first call's promise.
   * @returns {Promise<void>}
   */
  release() {
    this.#releasing ??= this.#release();
    return this.#releasing;
  }

  /** `await using lock = await dl.lock(name)` (TypeScript 5.2+) releases at the block's end. */
  [Symbol.asyncDispose]() {
    return this.release();
  }

  async #release() {
    const lease = this.#lease;
    const held = lease.isHeld();
    this.#renewer.forget(lease);
    // Worth trying until the server could expire the lease by itself (§5.7). A lease
    // presumed lost may still be held there until then: release it too, in the background.
    const cutoff = lease.deadline + lease.marginMs;
    if (!held) {
      lease.markLost();
      if (!lease.gone && now() < cutoff) {
        this.#send(cutoff, true).catch(() => {});
      }
      throw new LockLostError(lease.name, lease.lostReason);
    }
    const reply = await this.#send(cutoff);
    if (reply.status >= 200 && reply.status < 300) return;
    if (reply.status === 410 || reply.status === 404) {
      // A retried release whose first attempt succeeded unanswered finds nothing (§5.6).
      if (reply.attempts > 1) return;
      lease.markLost({ gone: true });
      throw new LockLostError(lease.name, lease.lostReason);
    }
    throw errorFromReply(reply);
  }

  /**
   * @param {number} cutoff
   * @param {boolean} [background] nobody waits for the answer
   */
  #send(cutoff, background = false) {
    const lease = this.#lease;
    return this.#transport.post(
      '/v1/release',
      () => ({ name: lease.name, lease_id: lease.leaseId }),
      { deadline: cutoff, perAttemptMs: RELEASE_ATTEMPT_MS, background },
    );
  }
}
