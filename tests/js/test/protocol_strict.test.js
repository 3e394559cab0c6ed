'use strict';
// RFC 6455 strictness at the edge: invalid close frames are answered 1002,
// the handshake must be a GET with version 13 and a real Sec-WebSocket-Key,
// and an API timestamp far in the past cannot overflow the freshness check.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: ['app1'] }, 'protocol-strict');

/** A masked client close frame with `payload`. */
function closeFrame(payload) {
  const mask = [1, 2, 3, 4];
  return Buffer.from([0x88, 0x80 | payload.length, ...mask, ...payload.map((b, i) => b ^ mask[i & 3])]);
}

/** Sends a raw HTTP request and resolves with the status line and headers. */
function rawHandshake(node, lines) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(node.port, h.HOST);
    let text = '';
    sock.on('error', reject);
    sock.on('data', (d) => {
      text += d;
      if (text.includes('\r\n\r\n')) { sock.destroy(); resolve(text); }
    });
    sock.on('connect', () => sock.write(`${lines.join('\r\n')}\r\n\r\n`));
  });
}

const handshake = (node, { method = 'GET', version = '13', key = 'dGhlIHNhbXBsZSBub25jZQ==' } = {}) => [
  `${method} /app/${node.app.key}?protocol=7 HTTP/1.1`, `Host: ${h.HOST}`, 'Upgrade: websocket', 'Connection: Upgrade',
  ...(key === null ? [] : [`Sec-WebSocket-Key: ${key}`]),
  ...(version === null ? [] : [`Sec-WebSocket-Version: ${version}`]),
  ...(method === 'POST' ? ['Content-Length: 0'] : []),
];

describe('protocol strictness', () => {
  for (const [label, payload] of [
    ['code 999', [0x03, 0xe7]],
    ['code 1005', [0x03, 0xed]],
    ['code 5000', [0x13, 0x88]],
    ['a 1-byte payload', [0x03]],
  ]) {
    it(`answers a close frame with ${label} with 1002`, async () => {
      const c = await h.rawClient(ctx.node);
      c.ws._socket.write(closeFrame(payload));
      const closed = await h.withTimeout(c.closed, 3000, 'close');
      assert.equal(closed.code, 1002);
    });
  }

  it('answers a valid close frame with 1000', async () => {
    const c = await h.rawClient(ctx.node);
    c.ws._socket.write(closeFrame([0x03, 0xe8]));
    const closed = await h.withTimeout(c.closed, 3000, 'close');
    assert.equal(closed.code, 1000);
  });

  it('refuses handshakes that are not GET, not version 13 or carry a bad key', async () => {
    const { node } = ctx;
    assert.match(await rawHandshake(node, handshake(node)), /^HTTP\/1\.1 101/);
    assert.match(await rawHandshake(node, handshake(node, { method: 'POST' })), /^HTTP\/1\.1 400/);
    const v8 = await rawHandshake(node, handshake(node, { version: '8' }));
    assert.match(v8, /^HTTP\/1\.1 426/);
    assert.match(v8, /sec-websocket-version: 13/i);
    assert.match(await rawHandshake(node, handshake(node, { version: null })), /^HTTP\/1\.1 426/);
    for (const key of ['not-a-key', 'dGhlIHNhbXBsZSBub25jZQ', 'dGhlIHNhbXBsZSBub25jZQ==AAAA', null]) {
      assert.match(await rawHandshake(node, handshake(node, { key })), /^HTTP\/1\.1 400/, `key ${key}`);
    }
  });

  it('refuses an API timestamp of now - 2^63 as stale', async () => {
    const { node } = ctx;
    const now = BigInt(Math.floor(Date.now() / 1000));
    for (const ts of [now - 2n ** 63n, -(2n ** 63n), 2n ** 63n - 1n]) {
      const res = await h.signedRequest(node, node.app, { method: 'GET', path: '/apps/app1/channels', timestamp: ts.toString() });
      assert.equal(res.status, 401, `${ts}: ${res.text}`);
      assert.match(res.json.error, /600 seconds/);
    }
  });
});
