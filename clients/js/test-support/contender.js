// A separate Node process that takes one lock `rounds` times with acquireLock and, holding
// it, writes to a shared journal (the "protected resource"): an `enter` line, a pause that
// yields to the event loop, an `exit` line, each carrying its fencing token.
//
// Usage: node contender.js URL LOCK_NAME ROUNDS JOURNAL LEASE_MS
// Appends are O_APPEND writes of one short line: the journal's order is the real order.

import { appendFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import DistributedLock from 'leasehold';

const [url, lockName, rounds, journal, leaseMs] = process.argv.slice(2);
const dl = new DistributedLock('exclusion-test', { url });
for (let round = 0; round < Number(rounds); round++) {
  await dl.acquireLock({
    lockName,
    expirationTimeMs: Number(leaseMs),
    fn: async ({ fencingToken }) => {
      appendFileSync(journal, `enter ${process.pid} ${fencingToken}\n`);
      // Give the other process every chance to run (and to write, were it let in).
      await readFile(journal);
      await new Promise((resolve) => setImmediate(resolve));
      appendFileSync(journal, `exit ${process.pid} ${fencingToken}\n`);
    },
  });
}
