// HTTP to the lock servers: Node's built-in fetch (HTTP/1.1, kept-alive connections),
// retries with the same body (docs/protocol.md §5.5), fail-over between endpoints, and the
// send time of the attempt that was answered, which leases are counted from (§5.2).

import { delays } from './backoff.js';
import { now } from './clock.js';
import {
  InvalidArgumentError,
  LimitReachedError,
  ServerError,
  UnauthorizedError,
  UnavailableError,
} from './errors.js';

/** How long past a call's deadline an answer may still arrive: a server that ends a wait at
 * the deadline answers one network trip later. */
const ANSWER_GRACE_MS = 1000;

/** Intermediaries' and the server's "try again" answers. */
const RETRYABLE = new Set([502, 503, 504]);

/**
 * @typedef {object} Reply
 * @property {number} status
 * @property {any} body parsed JSON, or null if the body was not JSON
 * @property {string} text the raw body
 * @property {string} endpoint
 * @property {number} attempts how many attempts were made; above 1, an earlier one may have
 *   been processed without its answer arriving
 * @property {number} sent when the answered attempt was sent (monotonic ms)
 * @property {number|null} retryAfterMs
 */

/**
 * @typedef {object} Attempts
 * @property {number} deadline stop retrying after this monotonic instant
 * @property {number} perAttemptMs longest wait for one answer
 * @property {AbortSignal} [signal] the caller gave up: abort the attempt, reject with its reason
 * @property {boolean} [background] nobody awaits it (a cancel, a release after a loss): its
 *   timers do not keep the process alive, so a program that is done exits without waiting
 *   for it to retry
 */

export class Transport {
  /** @type {string[]} */
  #endpoints;
  #current = 0;
  #authorization;

  /**
   * @param {string[]} endpoints base URLs, already checked
   * @param {string} apiKey already checked
   */
  constructor(endpoints, apiKey) {
    this.#endpoints = endpoints;
    this.#authorization = `Bearer ${apiKey}`;
    // Clients start at different endpoints, so that load spreads over the servers.
    this.#current = Math.floor(Math.random() * endpoints.length);
  }

  /**
   * POSTs a JSON body, made afresh for each attempt (an acquire's remaining wait shrinks).
   * @param {string} path
   * @param {() => object} body
   * @param {Attempts} attempts
   * @returns {Promise<Reply>}
   */
  post(path, body, attempts) {
    return this.#send('POST', path, body, attempts);
  }

  /**
   * @param {string} path already percent-encoded
   * @param {Attempts} attempts
   * @returns {Promise<Reply>}
   */
  get(path, attempts) {
    return this.#send('GET', path, null, attempts);
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {(() => object) | null} body
   * @param {Attempts} attempts
   * @returns {Promise<Reply>}
   */
  async #send(method, path, body, { deadline, perAttemptMs, signal, background = false }) {
    const backoff = delays();
    for (let attempt = 1; ; attempt++) {
      signal?.throwIfAborted();
      const index = this.#current;
      const endpoint = this.#endpoints[index % this.#endpoints.length];
      const answerBy = deadline + ANSWER_GRACE_MS - now();
      const timeoutMs = Math.max(1, Math.min(perAttemptMs, answerBy));
      let failure;
      let cause;
      try {
        const answer = await this.#attempt(method, endpoint + path, body, timeoutMs, signal, background);
        if (!RETRYABLE.has(answer.status)) {
          return { ...answer, endpoint, attempts: attempt };
        }
        failure = `answered ${answer.status}`;
      } catch (error) {
        if (signal?.aborted) {
          throw signal.reason;
        }
        failure = describe(error);
        cause = error;
      }
      // Move on from the failed endpoint unless another caller already did.
      if (this.#current === index) {
        this.#current = index + 1;
      }
      const delay = backoff.next().value;
      if (now() + delay >= deadline) {
        throw new UnavailableError(endpoint, failure, cause);
      }
      await pause(delay, signal, background);
    }
  }

  /**
   * One HTTP exchange, bounded by `timeoutMs`; throws on transport faults.
   * @param {string} method
   * @param {string} url
   * @param {(() => object) | null} body
   * @param {number} timeoutMs
   * @param {AbortSignal} [signal]
   * @param {boolean} [background]
   */
  async #attempt(method, url, body, timeoutMs, signal, background = false) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new Error(`no answer within ${Math.round(timeoutMs)} ms`)), timeoutMs);
    if (background) timer.unref();
    const onAbort = () => controller.abort(signal?.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      /** @type {Record<string, string>} */
      const headers = { authorization: this.#authorization };
      const init = { method, headers, signal: controller.signal };
      if (body) {
        headers['content-type'] = 'application/json';
        // @ts-ignore: a string body
        init.body = JSON.stringify(body());
      }
      // Taken before the request is handed to fetch: the server cannot start a lease
      // before this moment, so a deadline counted from it is never later than the server's.
      const sent = now();
      const response = await fetch(url, init);
      const text = await response.text();
      let parsed = null;
      try {
        parsed = JSON.parse(text);
      } catch {
        // Not JSON (a proxy's error page): callers see `text`.
      }
      const retryAfter = Number.parseInt(response.headers.get('retry-after') ?? '', 10);
      return {
        status: response.status,
        body: parsed,
        text,
        sent,
        retryAfterMs: Number.isFinite(retryAfter) ? retryAfter * 1000 : null,
      };
    } catch (error) {
      // The fetch was aborted by the timer: say so rather than "This operation was aborted".
      if (controller.signal.aborted && !signal?.aborted) {
        throw controller.signal.reason;
      }
      throw error;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
  }
}

/**
 * The error for an answer no caller handles specially (docs/protocol.md §4: branch on the
 * status and `error` code, never on the message).
 * @param {Reply} reply
 */
export function errorFromReply(reply) {
  const message = typeof reply.body?.message === 'string' ? reply.body.message : reply.text.slice(0, 200);
  switch (reply.status) {
    case 401:
      return new UnauthorizedError(reply.endpoint);
    case 400:
    case 408:
      return new InvalidArgumentError(message);
    case 429:
      return new LimitReachedError(reply.endpoint, message, reply.retryAfterMs);
    default:
      return new ServerError(reply.endpoint, reply.status, String(reply.body?.error ?? ''), message);
  }
}

/** A transport failure as one line: fetch itself says only "fetch failed". */
function describe(error) {
  if (!(error instanceof Error)) {
    return String(error);
  }
  const cause = /** @type {any} */ (error).cause;
  if (cause instanceof Error) {
    const code = /** @type {any} */ (cause).code;
    return `${error.message}: ${code ? `${code} ` : ''}${cause.message}`.trim();
  }
  return error.message;
}

/**
 * @param {number} ms
 * @param {AbortSignal} [signal]
 * @param {boolean} [background]
 */
function pause(ms, signal, background = false) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(done, ms);
    if (background) timer.unref();
    function done() {
      signal?.removeEventListener('abort', aborted);
      resolve(undefined);
    }
    function aborted() {
      clearTimeout(timer);
      reject(signal?.reason);
    }
    signal?.addEventListener('abort', aborted, { once: true });
  });
}
