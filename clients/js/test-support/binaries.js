// Where the Rust binaries the tests run are: $LEASEHOLD_SERVER_BIN and $LEASEHOLD_CLI_BIN,
// else cargo's debug build of this repository (clients/js/../../target/debug).

import { accessSync, constants } from 'node:fs';
import { fileURLToPath } from 'node:url';

const targetDebug = fileURLToPath(new URL('../../../target/debug/', import.meta.url));

/**
 * @param {string} envVar
 * @param {string} file
 */
function binary(envVar, file) {
  const path = process.env[envVar] || targetDebug + file;
  try {
    accessSync(path, constants.X_OK);
  } catch {
    throw new Error(
      `${file} not found at ${path}. Build it with \`cargo build --features cli,server --bins\` `
      + `in the repository root (or run .ci/test-js, which does), or set ${envVar} to its path.`,
    );
  }
  return path;
}

export const serverBin = () => binary('LEASEHOLD_SERVER_BIN', 'leasehold-server');
export const cliBin = () => binary('LEASEHOLD_CLI_BIN', 'leasehold');
