'use strict';
// Redis faults the bus must answer truthfully: a stalled Redis (SIGSTOP) makes nodes not ready
// within 3 s, every publish answered 200 is delivered and none answered 503 is delivered later; a
// node whose pub/sub connection Redis drops (CLIENT KILL, the pubsub output-buffer limit) reports
// the disconnect, resubscribes, and the next events arrive.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 2, apps: [{ id: 'app1' }] }, 'cluster-redis-faults');

const { readyz } = h;

function redisCli(...args) {
  return execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(ctx.cluster.redis.port), ...args]).toString().trim();
}

async function disconnects(node) {
  return h.metricValue((await h.getMetrics(node)).text, 'belfry_bus_subscriber_disconnects_total');
}

function received(client, channel) {
  return client.frames.filter((f) => f.event === 'Seq' && f.channel === channel).map((f) => f.data.n);
}

describe('cluster: Redis faults', () => {
  it('Redis frozen with SIGSTOP: not ready within 3 s; every 200 delivered once, no 503 delivered', async () => {
    const [A, B] = ctx.cluster.nodes;
    const channel = h.uniq('stall-');
    const sub = await h.rawClient(B);
    await sub.subscribe(channel);
    const sdkA = h.sdk(A, A.app, { timeout: 10000 });
    const log = [];
    let stop = false;
    const publisher = (async () => {
      for (let n = 0; !stop && n < 5000; n++) {
        const res = await h.sdkResult(sdkA.trigger(channel, 'Seq', { n })).catch((e) => ({ status: `error ${e.message}` }));
        log.push({ n, status: res.status });
        await h.sleep(20);
      }
    })();
    await h.eventually(() => log.filter((x) => x.status === 200).length >= 10, { timeout: 5000, message: '10 publishes before the stall' });
    const redis = ctx.cluster.redis.child;
    const stoppedAt = Date.now();
    redis.kill('SIGSTOP');
    try {
      await h.eventually(async () => (await readyz(A)) === 503 && (await readyz(B)) === 503, {
        timeout: 3000, interval: 100, message: '/readyz 503 on both nodes within 3 s of SIGSTOP',
      });
      const tookMs = Date.now() - stoppedAt;
      assert.ok(tookMs <= 3000, `readiness failed after ${tookMs} ms`);
      await h.sleep(4000);
    } finally {
      redis.kill('SIGCONT');
    }
    await h.eventually(async () => (await readyz(A)) === 200 && (await readyz(B)) === 200, { timeout: 10000, message: 'ready again after SIGCONT' });
    await h.eventually(() => log.filter((x) => x.status === 200 && x.n > log.findLast((y) => y.status !== 200)?.n).length >= 10, {
      timeout: 10000, message: 'publishes succeed again',
    });
    stop = true;
    await publisher;
    await h.sleep(1000);
    const got = received(sub, channel);
    const acked = log.filter((x) => x.status === 200).map((x) => x.n);
    const refused = log.filter((x) => x.status === 503).map((x) => x.n);
    assert.ok(refused.length > 0, 'publishes during the stall were refused with 503');
    const missing = acked.filter((n) => !got.includes(n));
    assert.deepEqual(missing, [], 'every publish answered 200 was delivered');
    assert.equal(new Set(got).size, got.length, 'nothing delivered twice');
    const lateRefused = refused.filter((n) => got.includes(n));
    assert.deepEqual(lateRefused, [], 'no publish answered 503 was delivered later');
    const others = log.filter((x) => ![200, 503, 504].includes(x.status));
    assert.deepEqual(others, [], 'every publish was answered 200, 503 or 504');
  });

  it('CLIENT KILL TYPE pubsub: the node counts the disconnect, resubscribes, and events arrive again', async () => {
    const [A, B] = ctx.cluster.nodes;
    const channel = h.uniq('killed-');
    const sub = await h.rawClient(B);
    await sub.subscribe(channel);
    const before = await disconnects(B);
    assert.equal(before, 0, 'the counter is exposed at 0 before any disconnect');
    assert.equal((await h.sdkResult(h.sdk(A).trigger(channel, 'Seq', { n: 1 }))).status, 200);
    await h.eventually(() => received(sub, channel).length === 1, { message: 'first event' });
    const killed = Number(redisCli('CLIENT', 'KILL', 'TYPE', 'pubsub'));
    assert.ok(killed >= 2, `both nodes' subscriber connections killed (${killed})`);
    await h.eventually(async () => (await disconnects(B)) > before, { message: 'belfry_bus_subscriber_disconnects_total rises on B' });
    await h.eventually(async () => (await readyz(B)) === 200, { message: 'B ready again' });
    await h.eventually(async () => {
      await h.sdkResult(h.sdk(A).trigger(channel, 'Seq', { n: 2 }));
      await h.sleep(100);
      return received(sub, channel).includes(2);
    }, { timeout: 5000, message: 'events after the resubscribe arrive' });
    assert.match(B.output ? B.output() : '', /lost its Redis subscriber connection/);
  });

  it('over the pubsub output-buffer limit: Redis drops the lagging node, which resubscribes', async () => {
    const [A, B] = ctx.cluster.nodes;
    const channel = h.uniq('obuf-');
    const sub = await h.rawClient(B);
    await sub.subscribe(channel);
    const before = await disconnects(B);
    const original = redisCli('CONFIG', 'GET', 'client-output-buffer-limit');
    redisCli('CONFIG', 'SET', 'client-output-buffer-limit', 'pubsub 64kb 32kb 1');
    try {
      B.child.kill('SIGSTOP'); // B stops reading: its Redis output buffer grows
      try {
        const sdkA = h.sdk(A);
        const data = { pad: 'x'.repeat(4000) };
        // Well past what loopback's autotuned socket buffers absorb (up to ~10 MB): 16 MB.
        let sent = 0;
        await Promise.all(Array.from({ length: 8 }, async () => {
          while (sent < 400) {
            sent++;
            const batch = Array.from({ length: 10 }, () => ({ channel, name: 'Pad', data }));
            assert.equal((await h.sdkResult(sdkA.triggerBatch(batch))).status, 200);
          }
        }));
        await h.sleep(300);
      } finally {
        B.child.kill('SIGCONT');
      }
      await h.eventually(async () => (await disconnects(B)) > before, {
        timeout: 5000, message: `B reports the dropped connection (${redisCli('INFO', 'stats').split('\n').filter((l) => l.includes('output_buffer')).join(' ')} ${redisCli('CONFIG', 'GET', 'client-output-buffer-limit').replace(/\n/g, ' ')})`,
      });
    } finally {
      const limits = original.split('\n')[1] || 'normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60';
      redisCli('CONFIG', 'SET', 'client-output-buffer-limit', limits);
    }
    await h.eventually(async () => (await readyz(B)) === 200, { message: 'B ready again' });
    await h.eventually(async () => {
      await h.sdkResult(h.sdk(A).trigger(channel, 'Seq', { n: 7 }));
      await h.sleep(100);
      return received(sub, channel).includes(7);
    }, { timeout: 5000, message: 'events after the resubscribe arrive' });
  });
});
