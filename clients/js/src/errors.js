// The errors the client throws. Every one extends DistributedLockError, so callers can tell
// the lock's failures from their own with one `instanceof`; `name` is set on each class so
// that logs and `err.name` checks read as in any other library. No message ever contains
// the API key.

/** Base class of every error this package throws. */
export class DistributedLockError extends Error {
  /**
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Bad input (lock name, duration, option, endpoint) or a request the server refused as malformed (400). */
export class InvalidArgumentError extends DistributedLockError {}

/**
 * The wait for the lock ended without it: `timeout` ran out, or `timeout: 0` found it taken.
 * `holder` and `fencingToken` say who held it at that moment, when the server said.
 */
export class TimeoutError extends DistributedLockError {
  /**
   * @param {{lockName: string, waitedMs: number, holder?: {metadata?: string|null, fencing_token?: number}|null}} details
   */
  constructor({ lockName, waitedMs, holder }) {
    const label = holder?.metadata ?? null;
    const token = holder?.fencing_token ?? null;
    let who = '';
    if (token !== null) {
      who = label !== null
        ? ` (held by ${JSON.stringify(label)}, fencing token ${token})`
        : ` (held under fencing token ${token})`;
    }
    super(`timed out after ${Math.round(waitedMs)} ms waiting for lock ${JSON.stringify(lockName)}${who}`);
    /** The lock waited for. */
    this.lockName = lockName;
    /** How long the caller waited, in milliseconds. */
    this.waitedMs = waitedMs;
    /** The holder's label when the wait ended, or null (nobody held it, or no label). */
    this.holder = label;
    /** The holder's fencing token when the wait ended, or null if nobody held it. */
    this.fencingToken = token;
  }
}

/**
 * The lease ended while it was believed held: renewals failed until it could expire, the
 * server said it is gone, or it was already gone at release. Another party may hold the lock.
 */
export class LockLostError extends DistributedLockError {
  /**
   * @param {string} lockName
   * @param {'expired' | 'max_hold' | 'revoked'} [reason]
   */
  constructor(lockName, reason = 'expired') {
    super(`lost the lease on lock ${JSON.stringify(lockName)} (${REASONS[reason] ?? reason})`);
    this.lockName = lockName;
    /**
     * Why: 'expired' (no renewal got through in time, or the server no longer knew the
     * lease), 'max_hold' (it reached its maxHoldMs) or 'revoked' (an operator revoked it).
     */
    this.reason = reason;
  }
}

const REASONS = {
  expired: 'the lease expired',
  max_hold: 'the lease reached its maxHoldMs',
  revoked: 'the lease was revoked',
};

/** The server refused the API key (401). */
export class UnauthorizedError extends DistributedLockError {
  /** @param {string} endpoint */
  constructor(endpoint) {
    super(`${endpoint} refused the API key (401 Unauthorized)`);
    this.endpoint = endpoint;
  }
}

/** No server answered (or all were shutting down) before the operation's deadline. */
export class UnavailableError extends DistributedLockError {
  /**
   * @param {string} endpoint
   * @param {string} reason
   * @param {unknown} [cause]
   */
  constructor(endpoint, reason, cause) {
    super(`lock server unavailable at ${endpoint}: ${reason}`, cause === undefined ? undefined : { cause });
    this.endpoint = endpoint;
  }
}

/** A server limit: the project's lock quota, the lock's waiter limit or the key's rate (429). */
export class LimitReachedError extends DistributedLockError {
  /**
   * @param {string} endpoint
   * @param {string} message
   * @param {number|null} retryAfterMs
   */
  constructor(endpoint, message, retryAfterMs) {
    super(`${endpoint} refused: ${message}`);
    this.endpoint = endpoint;
    /** How long the server asked to wait before trying again, or null. */
    this.retryAfterMs = retryAfterMs;
  }
}

/** Any other error answer of the server. */
export class ServerError extends DistributedLockError {
  /**
   * @param {string} endpoint
   * @param {number} status
   * @param {string} code
   * @param {string} message
   */
  constructor(endpoint, status, code, message) {
    super(`${endpoint} answered ${status}: ${message}`);
    this.endpoint = endpoint;
    this.status = status;
    /** The protocol's error code (`error` field), such as "not_found". */
    this.code = code;
  }
}
