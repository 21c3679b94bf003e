// One monotonic clock for every deadline: wall-clock steps (NTP, a VM resumed) must not
// stretch or shrink a lease.
import { performance } from 'node:perf_hooks';

/** Milliseconds on a monotonic clock. */
export const now = () => performance.now();

/**
 * A timer that does not keep the process alive by itself: a program that is done with its
 * work exits even if a lease is still tracked (the server then expires the lease).
 * @param {() => void} fn
 * @param {number} delayMs
 */
export function unrefTimer(fn, delayMs) {
  const timer = setTimeout(fn, Math.max(0, delayMs));
  timer.unref();
  return timer;
}
