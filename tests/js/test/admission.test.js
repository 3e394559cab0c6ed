'use strict';
// Admission control and slow consumers: over the node's connection ceiling
// a client is refused with 4100 (pusher-js retries with backoff), and a
// client that stops reading is closed as a slow consumer instead of growing
// the server's memory, while everyone else keeps getting events.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({
  node: { max_connections: 3, send_queue_frames: 8 },
  apps: [{ id: 'app1' }],
}, 'admission');

async function metric(node, name, labels) {
  const { text } = await h.getMetrics(node);
  return h.metricValue(text, name, labels) || 0;
}

describe('admission and slow consumers', () => {
  it('refuses connections over the node ceiling with 4100 and admits again once one leaves', async () => {
    const { node } = ctx;
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    const c = await h.rawClient(node);
    const refused = new h.RawClient(node.wsUrl(node.app.key));
    const f = await refused.next('pusher:error');
    assert.equal(f.data.code, 4100);
    const closed = await h.withTimeout(refused.closed, 3000, 'close after 4100');
    assert.equal(closed.code, 4100);
    assert.ok(await metric(node, 'belfry_connections_refused_total', { reason: 'capacity' }) >= 1);
    await a.ping();
    await b.ping();
    c.close();
    await h.withTimeout(c.closed, 3000, 'c closed');
    await h.eventually(async () => (await metric(node, 'belfry_connections', { app: 'app1' })) === 2,
      { message: 'a slot is free again' });
    const d = await h.rawClient(node);
    await d.ping();
  });

  it('closes a client that stops reading, and the others still get every event', async () => {
    const { node } = ctx;
    const channel = h.uniq('firehose-');
    const reader = await h.rawClient(node);
    await reader.subscribe(channel);
    const stalled = await h.rawClient(node);
    await stalled.subscribe(channel);
    // Stop reading: the kernel buffers fill, then the server's queue.
    stalled.ws._socket.pause();
    const sdk = h.sdk(node);
    const data = 'x'.repeat(9000);
    let sent = 0;
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      const batch = Array.from({ length: 10 }, (_, i) => ({ channel, name: 'big', data: `${sent + i}:${data}` }));
      const res = await h.sdkResult(sdk.triggerBatch(batch));
      assert.equal(res.status, 200, res.text);
      sent += 10;
      if (await metric(node, 'belfry_slow_consumer_disconnects_total', { app: 'app1' }) >= 1) break;
    }
    assert.ok(await metric(node, 'belfry_slow_consumer_disconnects_total', { app: 'app1' }) >= 1,
      `no slow-consumer disconnect after ${sent} events`);
    await h.eventually(async () => (await metric(node, 'belfry_connections', { app: 'app1' })) === 1,
      { message: 'the stalled client is gone', timeout: 5000 });
    // The reader got every event, in order.
    await h.eventually(() => reader.frames.filter((fr) => fr.event === 'big').length === sent,
      { message: `reader got all ${sent} events`, timeout: 10000 });
    const seq = reader.frames.filter((fr) => fr.event === 'big').map((fr) => Number(fr.data.split(':')[0]));
    assert.deepEqual(seq, Array.from({ length: sent }, (_, i) => i));
  });
});
