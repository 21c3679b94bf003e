// Checks of what callers pass in, so that mistakes fail at once with a message that names
// the option, instead of as a 400 from the server or a lock held for NaN milliseconds.

import { InvalidArgumentError } from './errors.js';

/** Default lease length, as in the original library. */
export const DEFAULT_EXPIRATION_MS = 10_000;
/** Longest lease the protocol allows a client to ask for (docs/protocol.md §2). */
export const MAX_LEASE_MS = 86_400_000;
/** Longest lock name or label, in UTF-8 bytes (docs/protocol.md §2). */
const MAX_NAME_BYTES = 256;
/** setTimeout's limit: a longer timeout would fire at once. */
const MAX_TIMER_MS = 2_147_483_647;

/**
 * A lock name or label. The server checks the characters (and names the offending code
 * point); here only what would otherwise be a confusing failure: type, emptiness, length.
 * @param {unknown} value
 * @param {string} what
 * @returns {string}
 */
export function checkName(value, what) {
  if (typeof value !== 'string') {
    throw new InvalidArgumentError(`${what} must be a string, got ${describeType(value)}`);
  }
  if (value.length === 0) {
    throw new InvalidArgumentError(`${what} is empty`);
  }
  if (!value.isWellFormed()) {
    throw new InvalidArgumentError(`${what} contains a lone UTF-16 surrogate, which is not valid UTF-8`);
  }
  const bytes = Buffer.byteLength(value, 'utf8');
  if (bytes > MAX_NAME_BYTES) {
    throw new InvalidArgumentError(`${what} is ${bytes} bytes long in UTF-8; the limit is ${MAX_NAME_BYTES}`);
  }
  return value;
}

/**
 * A duration in milliseconds: a finite, non-negative number (fractions are rounded up, so
 * that a lease is never shorter than asked).
 * @param {unknown} value
 * @param {string} what
 * @param {{min?: number, max?: number}} [bounds]
 * @returns {number}
 */
export function checkMs(value, what, { min = 0, max = MAX_TIMER_MS } = {}) {
  if (typeof value !== 'number' || Number.isNaN(value)) {
    throw new InvalidArgumentError(`${what} must be a number of milliseconds, got ${describeType(value)}`);
  }
  if (value < min || value > max) {
    throw new InvalidArgumentError(`${what} is ${value}; it must be between ${min} and ${max} ms`);
  }
  return Math.ceil(value);
}

/**
 * The options shared by `lock()` and `acquireLock()`.
 * @param {any} options
 * @returns {{leaseMs: number, timeoutMs: number|null, label: string|null, signal: AbortSignal|null}}
 */
export function checkLockOptions(options) {
  if (options === undefined || options === null) {
    options = {};
  }
  if (typeof options !== 'object') {
    throw new InvalidArgumentError(`options must be an object, got ${describeType(options)}`);
  }
  const { expirationTimeMs, timeout, label, signal } = options;
  if (signal !== undefined && signal !== null && !(signal instanceof AbortSignal)) {
    throw new InvalidArgumentError(`signal must be an AbortSignal, got ${describeType(signal)}`);
  }
  return {
    leaseMs: expirationTimeMs === undefined || expirationTimeMs === null
      ? DEFAULT_EXPIRATION_MS
      : checkMs(expirationTimeMs, 'expirationTimeMs', { min: 1, max: MAX_LEASE_MS }),
    timeoutMs: timeout === undefined || timeout === null ? null : checkMs(timeout, 'timeout'),
    label: label === undefined || label === null ? null : checkName(label, 'label'),
    signal: signal ?? null,
  };
}

/**
 * The client's endpoints: `url` (one URL, or several separated by commas, tried in turn).
 * @param {unknown} url
 * @returns {string[]}
 */
export function checkEndpoints(url) {
  if (typeof url !== 'string' || url.trim() === '') {
    throw new InvalidArgumentError('the lock server URL is empty');
  }
  return url.split(',').map((one) => {
    const text = one.trim();
    let parsed;
    try {
      parsed = new URL(text);
    } catch {
      throw new InvalidArgumentError(`endpoint ${JSON.stringify(text)} is not a URL`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new InvalidArgumentError(`endpoint ${JSON.stringify(text)} must start with http:// or https://`);
    }
    if (parsed.pathname !== '/' || parsed.search || parsed.hash || parsed.username || parsed.password) {
      throw new InvalidArgumentError(`endpoint ${JSON.stringify(text)} must be a base URL without path, query or credentials`);
    }
    return parsed.origin;
  });
}

/**
 * The API key: what the server accepts (docs/protocol.md §1), checked here so that a bad
 * one fails at construction. The key itself never appears in a message.
 * @param {unknown} apiKey
 * @returns {string}
 */
export function checkApiKey(apiKey) {
  if (typeof apiKey !== 'string') {
    throw new InvalidArgumentError(`the API key must be a string, got ${describeType(apiKey)}`);
  }
  const key = apiKey.trim();
  if (key === '') {
    throw new InvalidArgumentError('the API key is empty');
  }
  if (!/^[\x21-\x7e]+$/.test(key)) {
    throw new InvalidArgumentError('the API key contains characters other than visible ASCII');
  }
  return key;
}

/** @param {unknown} value */
export function describeType(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'number') return String(value);
  return typeof value;
}
