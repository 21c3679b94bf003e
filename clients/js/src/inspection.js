// `GET /v1/locks/NAME` (docs/protocol.md §3.5): the path, and the answer in JavaScript's
// naming.

/**
 * @typedef {object} HolderInfo
 * @property {number} fencingToken
 * @property {string|null} label
 * @property {number} acquiredAtMs Unix ms, server clock
 * @property {number} expiresAtMs Unix ms, server clock
 * @property {number} expiresInMs
 */

/**
 * @typedef {object} LockInfo
 * @property {string} name
 * @property {HolderInfo|null} holder
 * @property {number} waiters
 * @property {number|null} oldestWaitMs
 * @property {number|null} heldBackUntilMs
 */

/**
 * The path for `name`: every byte but the unreserved characters percent-encoded, as §3.5
 * asks (encodeURIComponent alone leaves `!'()*` as they are).
 * @param {string} name
 */
export function inspectionPath(name) {
  const encoded = encodeURIComponent(name).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
  return `/v1/locks/${encoded}`;
}

/**
 * @param {any} body
 * @returns {LockInfo}
 */
export function toLockInfo(body) {
  const holder = body.holder ?? null;
  return {
    name: body.name,
    holder: holder && {
      fencingToken: holder.fencing_token,
      label: holder.metadata ?? null,
      acquiredAtMs: holder.acquired_at_ms,
      expiresAtMs: holder.expires_at_ms,
      expiresInMs: holder.expires_in_ms,
    },
    waiters: body.waiters,
    oldestWaitMs: body.oldest_wait_ms ?? null,
    heldBackUntilMs: body.held_back_until_ms ?? null,
  };
}
