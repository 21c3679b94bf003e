// One held lease as the client tracks it: where its local deadline is, and the AbortSignal
// that tells its holder when it is lost (docs/protocol.md §5.2).

import { now, unrefTimer } from './clock.js';
import { LockLostError } from './errors.js';

/**
 * How long before the server could expire a lease the client presumes it lost: a tenth of
 * the lease up to one second (the reference default), or the configured margin capped at
 * half the lease.
 * @param {number} leaseMs
 * @param {number|null} configuredMs
 */
export function marginFor(leaseMs, configuredMs) {
  return configuredMs === null ? Math.min(leaseMs / 10, 1000) : Math.min(configuredMs, leaseMs / 2);
}

export class Lease {
  #controller = new AbortController();
  /** @type {ReturnType<typeof setTimeout> | null} */
  #deadlineTimer = null;

  /**
   * @param {object} grant
   * @param {string} grant.name
   * @param {string} grant.leaseId
   * @param {number} grant.fencingToken
   * @param {number} grant.lengthMs the lease length the server answered
   * @param {number} grant.marginMs
   * @param {number} grant.started no later than the server started the lease (monotonic ms)
   */
  constructor({ name, leaseId, fencingToken, lengthMs, marginMs, started }) {
    /** Why the lease was lost, once it is. @type {'expired' | 'max_hold' | 'revoked'} */
    this.lostReason = 'expired';
    this.name = name;
    this.leaseId = leaseId;
    this.fencingToken = fencingToken;
    this.lengthMs = lengthMs;
    this.marginMs = marginMs;
    /** When the holder must presume the lease lost (monotonic ms). */
    this.deadline = started + lengthMs - marginMs;
    /** When the next renewal is due. */
    this.due = started + lengthMs / 3;
    /** A renewal of this lease is in flight. */
    this.inFlight = false;
    /** The server said the lease is gone: no release is worth sending. */
    this.gone = false;
    /** The holder released it (or is releasing it): stop renewing. */
    this.done = false;
    /** Renewals answered `renewed` so far. */
    this.renewals = 0;
  }

  get signal() {
    return this.#controller.signal;
  }

  get lost() {
    return this.#controller.signal.aborted;
  }

  /** Held right now, by the clock: the deadline timer may fire late on a busy event loop. */
  isHeld() {
    return !this.lost && now() < this.deadline;
  }

  /**
   * A renewal sent at `sent` was answered `renewed` for `lengthMs`: the lease now runs until
   * later. A renewal answered after the deadline does not bring a lost lease back.
   * @param {number} sent
   * @param {number} lengthMs
   */
  renewed(sent, lengthMs) {
    if (!this.isHeld()) {
      this.markLost();
      return;
    }
    this.lengthMs = lengthMs;
    this.deadline = sent + lengthMs - this.marginMs;
    this.renewals += 1;
    this.due = sent + lengthMs / 3;
    this.watchDeadline();
  }

  /**
   * A grant that arrived with little of its lease left is renewed before it is handed over.
   * Until then its deadline is the last moment the server could still hold it: the server
   * granted it no later than now.
   */
  startConfirming() {
    this.deadline = now() + this.lengthMs;
    this.due = now();
  }

  /** (Re)arms the timer that declares the lease lost at its deadline. */
  watchDeadline() {
    this.stopWatching();
    if (this.lost) return;
    this.#deadlineTimer = unrefTimer(() => {
      // A renewal may have moved the deadline while this timer waited.
      if (now() >= this.deadline) this.markLost();
      else this.watchDeadline();
    }, this.deadline - now());
  }

  stopWatching() {
    if (this.#deadlineTimer !== null) {
      clearTimeout(this.#deadlineTimer);
      this.#deadlineTimer = null;
    }
  }

  /**
   * @param {{gone?: boolean, reason?: 'expired' | 'max_hold' | 'revoked'}} [how] gone: the
   *   server said so, and why
   */
  markLost({ gone = false, reason = 'expired' } = {}) {
    this.stopWatching();
    this.gone ||= gone;
    if (!this.lost) {
      this.lostReason = reason;
      this.#controller.abort(new LockLostError(this.name, reason));
    }
  }
}
