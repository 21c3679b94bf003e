// Waiting in the server's line (docs/protocol.md §5.1): long polls under one request id,
// each asking for the wait that remains, until granted, timed out or given up; a cancel
// when the caller gives up, so no place in line or grant is left behind.

import { now } from './clock.js';
import { TimeoutError } from './errors.js';
import { randomId } from './ids.js';
import { errorFromReply } from './transport.js';

/** How long the server may hold one poll open before answering 202. */
const POLL_MS = 20_000;
/** Extra time past the poll bound before an unanswered poll counts as a transport failure. */
const POLL_SLACK_MS = 5_000;
/** A cancel is worth trying this long (§5.5), each attempt this long. */
const CANCEL_DEADLINE_MS = 5_000;
const CANCEL_ATTEMPT_MS = 2_000;

/**
 * @typedef {object} Grant
 * @property {string} leaseId
 * @property {number} fencingToken
 * @property {number} lengthMs
 * @property {number} started no later than the server started the lease (monotonic ms)
 */

/**
 * Waits for the lock `name`; resolves with the grant.
 * @param {import('./transport.js').Transport} transport
 * @param {object} request
 * @param {string} request.name
 * @param {number} request.leaseMs
 * @param {number|null} request.waitDeadline monotonic ms, or null to wait without limit
 * @param {number} request.started when the caller asked (for the timeout's message)
 * @param {string|null} request.label
 * @param {AbortSignal|null} request.signal
 * @param {number} request.unavailableAfterMs
 * @returns {Promise<Grant>}
 */
export async function waitInLine(transport, { name, leaseMs, waitDeadline, started, label, signal, unavailableAfterMs }) {
  // One id for every poll and retry of this attempt (§2): a retry finds the same place in
  // line or the same grant, never a second one.
  const requestId = randomId();
  // Set until the id's first send: any later body (a retry, a re-poll) may find a place the
  // server already gave it, so only the first says `first` (§3.1; cheaper on etcd).
  let unsent = true;
  const firstSend = () => {
    const first = unsent;
    unsent = false;
    return first;
  };
  let answered = false;
  try {
    for (;;) {
      const polled = now();
      const reply = await transport.post(
        '/v1/acquire',
        () => ({
          ...(firstSend() ? { first: true } : {}),
          name,
          lease_ms: leaseMs,
          // The server counts the wait from each request's arrival: ask for what remains
          // (rounded up, so that a caller's `timeout` is always waited out in full).
          ...(waitDeadline === null ? {} : { wait_ms: Math.max(0, Math.ceil(waitDeadline - now())) }),
          poll_ms: POLL_MS,
          request_id: requestId,
          ...(label === null ? {} : { metadata: label }),
        }),
        {
          // Unreachable servers end the call at the caller's timeout, or after
          // `unavailableAfterMs` when it waits without limit.
          deadline: waitDeadline ?? polled + unavailableAfterMs,
          perAttemptMs: POLL_MS + POLL_SLACK_MS,
          signal: signal ?? undefined,
        },
      );
      if (reply.status === 202) continue;
      answered = true;
      if (reply.status === 200) {
        const body = reply.body;
        if (typeof body?.lease_id !== 'string' || !Number.isSafeInteger(body.fencing_token)
          || !Number.isSafeInteger(body.lease_ms) || !Number.isSafeInteger(body.waited_ms)) {
          // A grant we cannot use: give it back rather than leave it to expire.
          answered = false;
          throw errorFromReply({ ...reply, status: 502 });
        }
        return {
          leaseId: body.lease_id,
          fencingToken: body.fencing_token,
          lengthMs: body.lease_ms,
          // The lease started `waited_ms` after the server received the request, so no
          // earlier than that long after it was sent (and no later than now).
          started: reply.sent + Math.min(body.waited_ms, now() - reply.sent),
        };
      }
      // Only `409 timeout` is a timeout (docs/protocol.md §4): `409 conflict` (the name is a
      // semaphore in use), or a code this client does not know, says why below.
      if (reply.status === 409 && reply.body?.error === 'timeout') {
        throw new TimeoutError({ lockName: name, waitedMs: now() - started, holder: reply.body?.holder });
      }
      throw errorFromReply(reply);
    }
  } finally {
    if (!answered) {
      // Given up (aborted, transport retries exhausted, unusable answer): withdraw the
      // waiter, or release a grant that raced with giving up. Best effort, not awaited.
      cancel(transport, name, requestId);
    }
  }
}

/**
 * @param {import('./transport.js').Transport} transport
 * @param {string} name
 * @param {string} requestId
 */
function cancel(transport, name, requestId) {
  transport
    .post('/v1/cancel', () => ({ name, request_id: requestId }), {
      deadline: now() + CANCEL_DEADLINE_MS,
      perAttemptMs: CANCEL_ATTEMPT_MS,
      background: true,
    })
    .catch(() => {});
}
