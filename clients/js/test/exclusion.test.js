// Mutual exclusion across two Node processes, checked the way a fenced resource would: the
// shared journal shows every critical section whole, one after another, with fencing tokens
// that only increase.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { startServer } from '../test-support/server.js';
import { exited, within } from '../test-support/time.js';

const CONTENDER = fileURLToPath(new URL('../test-support/contender.js', import.meta.url));
const ROUNDS = 25;
const LEASE_MS = 2000;

test('two processes never hold the lock at once, and tokens increase', async () => {
  const server = await startServer();
  const dir = mkdtempSync(join(tmpdir(), 'leasehold-js-exclusion-'));
  const journal = join(dir, 'journal');
  try {
    const children = [0, 1].map(() => spawn(process.execPath, [CONTENDER, server.url, 'shared-resource', String(ROUNDS), journal, String(LEASE_MS)], {
      stdio: ['ignore', 'inherit', 'inherit'],
    }));
    // Each round holds the lock for a few event-loop turns; even if every round of the
    // other process waited out a whole lease, both finish within this.
    const codes = await within(2 * ROUNDS * LEASE_MS, 'both contenders to finish', Promise.all(children.map(exited)));
    assert.deepEqual(codes, [0, 0]);

    const lines = readFileSync(journal, 'utf8').trim().split('\n').map((line) => line.split(' '));
    assert.equal(lines.length, 2 * 2 * ROUNDS);
    const pids = new Set();
    let lastToken = 0;
    for (let i = 0; i < lines.length; i += 2) {
      const [enter, enterPid, enterToken] = lines[i];
      const [exit, exitPid, exitToken] = lines[i + 1];
      assert.equal(enter, 'enter', `line ${i + 1}: a section began inside another`);
      assert.equal(exit, 'exit', `line ${i + 2}: a section began inside another`);
      assert.equal(exitPid, enterPid, `lines ${i + 1}-${i + 2}: two holders at once`);
      assert.equal(exitToken, enterToken);
      const token = Number(enterToken);
      assert.ok(token > lastToken, `fencing token ${token} after ${lastToken}`);
      lastToken = token;
      pids.add(enterPid);
    }
    assert.equal(pids.size, 2, 'both processes held the lock');
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
