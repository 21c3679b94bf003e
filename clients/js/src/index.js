// The package's entry point: the client as the default export (the original library's
// import shape), and the error classes for `instanceof`.
export { default, DEFAULT_URL } from './distributed-lock.js';
export { Lock } from './lock.js';
export {
  DistributedLockError,
  InvalidArgumentError,
  LimitReachedError,
  LockLostError,
  ServerError,
  TimeoutError,
  UnauthorizedError,
  UnavailableError,
} from './errors.js';
export { default as DistributedLock } from './distributed-lock.js';
