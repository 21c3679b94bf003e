// An HTTP proxy in front of a real server that records every request the client sends and
// every answer the server gives, and can delay a request or lose an answer: what a slow or
// broken network does. It never makes an answer up.

import { EventEmitter } from 'node:events';
import http from 'node:http';

/**
 * @typedef {object} Exchange
 * @property {string} method
 * @property {string} path
 * @property {any} body the request's JSON body (null without one)
 * @property {number} status the server's answer (0 until it came)
 * @property {any} answer the server's JSON answer
 * @property {boolean} lost the answer was kept from the client
 */

/**
 * @param {string} upstream the server's base URL
 */
export async function startProxy(upstream) {
  const target = new URL(upstream);
  const events = new EventEmitter();
  /** @type {Exchange[]} */
  const exchanges = [];
  /** @type {{path: string, delayMs: number}[]} */
  const delays = [];
  /** @type {string[]} */
  const losses = [];

  const server = http.createServer((request, response) => {
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', async () => {
      const raw = Buffer.concat(chunks);
      /** @type {Exchange} */
      const exchange = {
        method: request.method ?? '',
        path: request.url ?? '',
        body: raw.length ? JSON.parse(raw.toString()) : null,
        status: 0,
        answer: null,
        lost: false,
      };
      exchanges.push(exchange);
      events.emit('request', exchange);
      const delay = takeFirst(delays, (d) => d.path === exchange.path);
      if (delay) await new Promise((resolve) => setTimeout(resolve, delay.delayMs));
      const lose = takeFirst(losses, (path) => path === exchange.path) !== undefined;
      const forwarded = http.request({
        host: target.hostname,
        port: target.port,
        method: request.method,
        path: request.url,
        headers: request.headers,
      }, (answer) => {
        const parts = [];
        answer.on('data', (part) => parts.push(part));
        answer.on('end', () => {
          const text = Buffer.concat(parts).toString();
          exchange.status = answer.statusCode ?? 0;
          try { exchange.answer = JSON.parse(text); } catch { exchange.answer = text; }
          exchange.lost = lose;
          events.emit('answer', exchange);
          if (lose) {
            // The server acted on the request; the client never hears of it.
            request.socket.destroy();
            return;
          }
          response.writeHead(exchange.status, answer.headers);
          response.end(text);
        });
      });
      forwarded.on('error', () => request.socket.destroy());
      forwarded.end(raw);
    });
  });
  let connections = 0;
  server.on('connection', () => { connections += 1; });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  const { port } = /** @type {import('node:net').AddressInfo} */ (server.address());

  return {
    url: `http://127.0.0.1:${port}`,
    exchanges,
    /** TCP connections the client opened so far. */
    connections: () => connections,
    /** Requests to `path` so far. */
    sent: (/** @type {string} */ path) => exchanges.filter((e) => e.path === path),
    /** Holds the next request to `path` this long before passing it on. */
    delayNext(/** @type {string} */ path, /** @type {number} */ delayMs) { delays.push({ path, delayMs }); },
    /** Passes the next request to `path` on, but keeps the server's answer from the client. */
    loseNextAnswer(/** @type {string} */ path) { losses.push(path); },
    /**
     * Resolves with the first exchange (already seen or to come) that `match` accepts,
     * once it has been answered.
     * @param {(e: Exchange) => boolean} match
     * @returns {Promise<Exchange>}
     */
    answered(match) {
      const seen = exchanges.find((e) => e.status !== 0 && match(e));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve) => {
        const listener = (/** @type {Exchange} */ e) => {
          if (match(e)) {
            events.off('answer', listener);
            resolve(e);
          }
        };
        events.on('answer', listener);
      });
    },
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve(undefined));
    }),
  };
}

/**
 * Removes and returns the first element that `match` accepts.
 * @template T
 * @param {T[]} list
 * @param {(item: T) => boolean} match
 */
function takeFirst(list, match) {
  const i = list.findIndex(match);
  return i === -1 ? undefined : list.splice(i, 1)[0];
}
