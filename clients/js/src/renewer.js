// One renewer per client: renews every due lease of the client in one batched request
// (docs/protocol.md §5.3), retries failed batches with backoff until the earliest deadline
// in them, and declares leases lost when they pass their deadline or the server says `gone`.

import { delays } from './backoff.js';
import { now, unrefTimer } from './clock.js';
import { MAX_LEASE_MS } from './options.js';

/** Most leases in one renew request (MAX_RENEW_BATCH). */
const MAX_BATCH = 1000;
/** Longest pause between two ticks; a thirtieth of the lease when shorter. Leases granted one
 * after another then share a request instead of one each. */
const TICK_GAP_MS = 25;
/** The shortest time one renew attempt is given, however close the deadline. */
const MIN_ATTEMPT_MS = 50;

export class Renewer {
  #transport;
  /** @type {Set<import('./lease.js').Lease>} */
  #leases = new Set();
  /** @type {ReturnType<typeof setTimeout> | null} */
  #timer = null;
  #timerAt = Infinity;
  #lastTick = -Infinity;
  #failures = delays();

  /** @param {import('./transport.js').Transport} transport */
  constructor(transport) {
    this.#transport = transport;
  }

  /**
   * Starts renewing a lease and watching its deadline.
   * @param {import('./lease.js').Lease} lease
   */
  track(lease) {
    this.#leases.add(lease);
    lease.watchDeadline();
    this.#schedule();
  }

  /**
   * Stops renewing a lease (released, or being released).
   * @param {import('./lease.js').Lease} lease
   */
  forget(lease) {
    lease.done = true;
    lease.stopWatching();
    this.#leases.delete(lease);
    this.#schedule();
  }

  /**
   * Renews one lease at once, outside the schedule: a grant that arrived with little of its
   * lease left is confirmed before it is handed over. Resolves true if it is held after.
   * @param {import('./lease.js').Lease} lease
   */
  async confirm(lease) {
    lease.startConfirming();
    this.#leases.add(lease);
    lease.watchDeadline();
    await this.#renew([lease], now());
    return lease.renewals > 0 && lease.isHeld();
  }

  /** Arms the one timer for the next tick: the earliest due renewal, spaced from the last. */
  #schedule() {
    let earliest = Infinity;
    let gap = TICK_GAP_MS;
    for (const lease of this.#leases) {
      if (!lease.inFlight && !lease.lost && lease.due < earliest) {
        earliest = lease.due;
        gap = Math.min(TICK_GAP_MS, lease.lengthMs / 30);
      }
    }
    const at = earliest === Infinity ? Infinity : Math.max(earliest, this.#lastTick + gap);
    if (at === this.#timerAt) return;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    this.#timerAt = at;
    if (at !== Infinity) {
      this.#timer = unrefTimer(() => this.#tick(), at - now());
    }
  }

  /** Sends every due lease, and those within a sixth of a lease of being due, in batches. */
  #tick() {
    this.#timer = null;
    this.#timerAt = Infinity;
    const sent = now();
    this.#lastTick = sent;
    const due = [];
    for (const lease of this.#leases) {
      if (!lease.lost && sent >= lease.deadline) {
        // Overdue (its timer may not have run yet on a busy event loop): no renewal brings
        // it back.
        lease.markLost();
      }
      if (lease.lost) {
        this.#leases.delete(lease);
      } else if (!lease.inFlight && lease.due <= sent + lease.lengthMs / 6) {
        due.push(lease);
      }
    }
    for (let i = 0; i < due.length; i += MAX_BATCH) {
      void this.#renew(due.slice(i, i + MAX_BATCH), sent);
    }
    this.#schedule();
  }

  /**
   * One renew request for `batch`, retried until the earliest deadline in it.
   * @param {import('./lease.js').Lease[]} batch
   * @param {number} sent
   */
  async #renew(batch, sent) {
    for (const lease of batch) lease.inFlight = true;
    const deadline = Math.min(...batch.map((lease) => lease.deadline));
    let results = null;
    try {
      const reply = await this.#transport.post(
        '/v1/renew',
        () => ({ leases: batch.map((lease) => ({ name: lease.name, lease_id: lease.leaseId })) }),
        // With one server a slow answer is worth waiting for: abandoning it only makes the
        // server do the same work again.
        { deadline, perAttemptMs: Math.max(MIN_ATTEMPT_MS, deadline - sent) },
      );
      const answered = reply.body?.results;
      if (reply.status === 200 && Array.isArray(answered) && answered.length === batch.length) {
        results = answered;
        // Count from the attempt that was answered (§5.2).
        sent = reply.sent;
      }
    } catch {
      // Unreachable until the deadline: the leases are lost below.
    }
    const retryAt = results === null ? now() + this.#failures.next().value : null;
    if (results !== null) this.#failures = delays();
    batch.forEach((lease, i) => {
      lease.inFlight = false;
      if (lease.done) return;
      const result = results?.[i];
      if (now() >= lease.deadline) {
        lease.markLost();
      } else if (result?.status === 'renewed' && Number.isSafeInteger(result.lease_ms)) {
        // A server's figures are checked, not trusted: no lease beyond the protocol's longest.
        lease.renewed(sent, Math.min(result.lease_ms, MAX_LEASE_MS));
      } else if (result?.status === 'gone') {
        const reason = result.reason === 'max_hold' || result.reason === 'revoked'
          ? result.reason
          : 'expired';
        lease.markLost({ gone: true, reason });
      } else {
        lease.due = Math.min(retryAt ?? now(), lease.deadline);
      }
      if (lease.lost) this.#leases.delete(lease);
    });
    this.#schedule();
  }
}
