// Types of the `leasehold` package, written by hand (the package ships JavaScript with JSDoc
// and no build step). Keep in step with src/.

/** What `fn` receives while it holds the lock. */
export interface HeldLock {
  /** Aborts, with a LockLostError as its reason, if the lease is lost while `fn` runs. */
  signal: AbortSignal;
  /** Greater than the token of every earlier grant of this lock: pass it to what you protect. */
  fencingToken: number;
}

export interface LockOptions {
  /** Lease length in ms (default 10000). The lease renews itself while held. */
  expirationTimeMs?: number;
  /** Longest wait for the lock in ms (default: no limit); 0 tries once. Then TimeoutError. */
  timeout?: number;
  /** Shown to others while you hold the lock (inspection, their TimeoutError), e.g. "host-a/job-42". */
  label?: string;
  /** Give up waiting when it aborts: the wait rejects with its reason and leaves the line. */
  signal?: AbortSignal;
}

export interface AcquireLockOptions<T> extends LockOptions {
  lockName: string;
  fn: (held: HeldLock) => T | Promise<T>;
}

export interface ClientOptions {
  /** Server base URL, or several separated by commas (default: $LEASEHOLD_URL, else http://127.0.0.1:7878). */
  url?: string;
  /** How long before the server could expire a lease it is presumed lost (default: a tenth of the lease, at most 1000 ms; capped at half the lease). */
  safetyMarginMs?: number;
  /** Without a timeout, give up on unreachable servers after this long (default 30000). */
  unavailableAfterMs?: number;
}

export interface HolderInfo {
  fencingToken: number;
  label: string | null;
  /** Unix ms, by the server's clock. */
  acquiredAtMs: number;
  /** Unix ms, by the server's clock. */
  expiresAtMs: number;
  expiresInMs: number;
}

export interface LockInfo {
  name: string;
  /** null while the lock is between holders. */
  holder: HolderInfo | null;
  waiters: number;
  oldestWaitMs: number | null;
  /** Unix ms (server clock) until which no grant is made after a server restart, or null. */
  heldBackUntilMs: number | null;
}

/** A held lock (guard style). */
export class Lock {
  private constructor();
  readonly name: string;
  readonly fencingToken: number;
  /** Aborts, with a LockLostError as its reason, if the lease is lost while held. */
  readonly signal: AbortSignal;
  /** Held now: not lost, not released, local deadline not passed. */
  isHeld(): boolean;
  /** Releases the lock; rejects with LockLostError if the lease was already lost. Idempotent. */
  release(): Promise<void>;
  /** `await using lock = await dl.lock(name)` releases at the end of the block. */
  [Symbol.asyncDispose](): Promise<void>;
}

export default class DistributedLock {
  constructor(apiKey: string, options?: ClientOptions);
  /** Takes the lock, runs `fn` holding it (renewing the lease), releases it, resolves with `fn`'s value. */
  acquireLock<T>(options: AcquireLockOptions<T>): Promise<T>;
  /** Waits for the lock; call `release()` on the result when done. */
  lock(name: string, options?: LockOptions): Promise<Lock>;
  /** Who holds the lock and how many wait; null if nobody holds or waits for it. */
  inspect(name: string): Promise<LockInfo | null>;
}
export { DistributedLock };

export const DEFAULT_URL: string;

/** Base class of every error this package throws. */
export class DistributedLockError extends Error {}

/** Bad input, or a request the server refused as malformed (400). */
export class InvalidArgumentError extends DistributedLockError {}

/** The wait ended without the lock. */
export class TimeoutError extends DistributedLockError {
  readonly lockName: string;
  readonly waitedMs: number;
  /** The holder's label when the wait ended, or null. */
  readonly holder: string | null;
  /** The holder's fencing token when the wait ended, or null if nobody held it. */
  readonly fencingToken: number | null;
}

/** The lease ended while it was believed held. */
export class LockLostError extends DistributedLockError {
  readonly lockName: string;
  /**
   * Why: `expired` (no renewal got through in time, or the server no longer knew the lease),
   * `max_hold` (it reached the hold limit its acquire set) or `revoked` (an operator revoked
   * it, `leasehold revoke NAME`).
   */
  readonly reason: 'expired' | 'max_hold' | 'revoked';
}

/** The server refused the API key (401). */
export class UnauthorizedError extends DistributedLockError {
  readonly endpoint: string;
}

/** No server answered before the operation's deadline. */
export class UnavailableError extends DistributedLockError {
  readonly endpoint: string;
}

/** A server limit was reached (429). */
export class LimitReachedError extends DistributedLockError {
  readonly endpoint: string;
  readonly retryAfterMs: number | null;
}

/** Any other error answer of the server. */
export class ServerError extends DistributedLockError {
  readonly endpoint: string;
  readonly status: number;
  readonly code: string;
}
