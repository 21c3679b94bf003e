// The retry policy of docs/protocol.md §5.5: exponential backoff with jitter, from 5 ms
// doubling up to 500 ms. Callers stop at their own deadline, so the sequence never ends.

const FIRST_MS = 5;
const LONGEST_MS = 500;

/** @returns {Generator<number, never>} delays in milliseconds */
export function* delays() {
  let base = FIRST_MS;
  for (;;) {
    // Full jitter on top of the base, as the reference client does: clients that failed
    // together do not retry in lockstep.
    yield base + Math.random() * base;
    base = Math.min(base * 2, LONGEST_MS);
  }
}
