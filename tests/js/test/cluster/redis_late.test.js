'use strict';
// A node started before Redis is up serves sockets, reports not ready, and
// joins the cluster by itself once Redis comes (a rollout where Redis starts
// last, or a Redis outage during a node restart).
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

describe('cluster: Redis comes up after the node', () => {
  it('is not ready without Redis, then becomes ready and delivers once Redis is up', async () => {
    const redisPort = await h.freePort();
    const node = await h.startNode({ redisUrl: `redis://${h.HOST}:${redisPort}`, apps: [{ id: 'app1' }] });
    let redis;
    try {
      assert.equal((await fetch(node.metricsUrl('/readyz'))).status, 503, 'not ready without Redis');
      redis = await h.startRedis({ port: redisPort });
      await h.eventually(async () => (await fetch(node.metricsUrl('/readyz'))).status === 200,
        { timeout: 10000, message: 'ready once Redis is up' });
      const channel = h.uniq('late-');
      const client = h.pusherClient(node);
      const ch = await h.subscribed(client, channel);
      const got = h.waitForEvent(ch, 'hello', 5000);
      const res = await h.sdkResult(h.sdk(node).trigger(channel, 'hello', { ok: true }));
      assert.equal(res.status, 200, res.text);
      assert.deepEqual(await got, { ok: true });
    } finally {
      await node.stop();
      if (redis) await redis.stop();
    }
  });
});
