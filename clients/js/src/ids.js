// Request ids (docs/protocol.md §2): 128 random bits as 32 lowercase hex digits. They are
// secrets (a cancel with one releases its grant), hence the CSPRNG.
import { randomBytes } from 'node:crypto';

/** @returns {string} */
export const randomId = () => randomBytes(16).toString('hex');
