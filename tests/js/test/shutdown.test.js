'use strict';
// SIGTERM: readiness fails, clients are closed with 4200 (reconnect now), the process exits in time.
const { describe, it, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

let node;
after(async () => {
  await h.cleanupClients();
  if (node) { await node.kill(); h.saveLog(node, 'shutdown'); }
});

describe('graceful shutdown', () => {
  it('SIGTERM closes clients with 4200 and exits within shutdown_grace_secs', async () => {
    node = await h.startNode({ apps: ['app1'], node: { shutdown_grace_secs: 3 } });
    const raw = await h.rawClient(node);
    await raw.subscribe(h.uniq('bye-'));
    const client = h.pusherClient(node);
    await h.connected(client);
    const dropped = new Promise((resolve) => {
      client.connection.bind('state_change', ({ previous }) => { if (previous === 'connected') resolve(); });
    });
    const exited = new Promise((resolve) => node.child.once('exit', (code, signal) => resolve({ code, signal })));
    const start = Date.now();
    node.child.kill('SIGTERM');
    const info = await h.withTimeout(raw.closed, 5000, 'close on shutdown');
    assert.equal(info.code, 4200, `close code ${info.code} ${info.reason}`);
    await h.withTimeout(dropped, 5000, 'pusher-js dropped');
    client.disconnect();
    const ex = await h.withTimeout(exited, 6000, 'process exit');
    assert.ok(Date.now() - start <= 4500, `exited after ${Date.now() - start} ms (grace 3 s)`);
    assert.equal(ex.code, 0, `exit ${JSON.stringify(ex)}`);
  });
});
