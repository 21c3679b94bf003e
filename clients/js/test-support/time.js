// Waiting for observable events, each wait bounded by a limit the test derives from the
// leases and timeouts it chose: a bound is a failure report, never a pause.

import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Resolves with `promise`, or rejects if it takes longer than `ms`.
 * @template T
 * @param {number} ms
 * @param {string} what what is waited for, for the failure message
 * @param {Promise<T>} promise
 * @returns {Promise<T>}
 */
export async function within(ms, what, promise) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`waited ${ms} ms for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Checks `condition` until it holds (every 10 ms), for at most `ms`.
 * @param {number} ms
 * @param {string} what
 * @param {() => boolean | Promise<boolean>} condition
 */
export async function until(ms, what, condition) {
  const end = performance.now() + ms;
  for (;;) {
    if (await condition()) return;
    if (performance.now() > end) throw new Error(`waited ${ms} ms for ${what}`);
    await sleep(10);
  }
}

/**
 * Waits for a file a child process writes (it writes a temporary file and renames it, so
 * that existence means complete).
 * @param {number} ms
 * @param {string} path
 */
export const fileAppears = (ms, path) => until(ms, `${path} to appear`, () => existsSync(path));

/**
 * Resolves when `child` exits, with its exit code.
 * @param {import('node:child_process').ChildProcess} child
 */
export function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve(child.exitCode);
  }
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}
