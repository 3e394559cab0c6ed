'use strict';
// The metrics port: Prometheus text with per-app connection gauges that follow the clients.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'm1' }, { id: 'm2' }] }, 'metrics');

async function connections(node, app) {
  const { status, text } = await h.getMetrics(node);
  assert.equal(status, 200);
  return h.metricValue(text, 'belfry_connections', { app });
}

async function expectConnections(node, app, n) {
  await h.eventually(async () => (await connections(node, app)) === n,
    { timeout: 3000, message: `belfry_connections{app="${app}"} == ${n}` });
}

/** The node's metric names from docs/operations.md's table (the coordinator's are its own). */
function documentedNodeMetrics() {
  const doc = fs.readFileSync(path.join(__dirname, '../../../docs/operations.md'), 'utf8');
  return [...doc.matchAll(/^\| `(belfry_[a-z_]+)` \| (gauge|counter|histogram) \|/gm)]
    .map((m) => ({ name: m[1], type: m[2] }))
    .filter((m) => !m.name.startsWith('belfry_coordinator_'));
}

describe('metrics', () => {
  it('a fresh node exposes every documented metric before anything happened, counters at 0', async () => {
    const node = await h.startNode({ apps: [{ id: 'fresh1' }, { id: 'fresh2' }] });
    try {
      const { text } = await h.getMetrics(node);
      const documented = documentedNodeMetrics();
      assert.ok(documented.length >= 15, `metric table parsed (${documented.length})`);
      for (const { name, type } of documented) {
        const sample = type === 'histogram' ? `${name}_count` : name;
        assert.notEqual(h.metricValue(text, sample), undefined, `${sample} missing from a fresh node's /metrics`);
      }
      for (const app of ['fresh1', 'fresh2']) {
        assert.equal(h.metricValue(text, 'belfry_connections_closed_total', { app, reason: 'ping_timeout' }), 0, app);
        assert.equal(h.metricValue(text, 'belfry_rate_limited_total', { app, kind: 'api' }), 0, app);
        assert.equal(h.metricValue(text, 'belfry_messages_out_total', { app }), 0, app);
      }
      for (const reason of ['unknown_app', 'capacity', 'ip_rate', 'fd_reserve']) {
        assert.equal(h.metricValue(text, 'belfry_connections_refused_total', { reason }), 0, reason);
      }
    } finally {
      await node.stop();
    }
  });

  it('GET /metrics answers Prometheus text; /healthz and /readyz answer 200 on the metrics port', async () => {
    const { node } = ctx;
    const res = await fetch(node.metricsUrl('/metrics'));
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') || '', /text\/plain/);
    const text = await res.text();
    assert.match(text, /^# (HELP|TYPE) belfry_/m);
    for (const p of ['/healthz', '/readyz']) {
      const r = await fetch(node.metricsUrl(p));
      await r.text();
      assert.equal(r.status, 200, p);
    }
  });

  it('belfry_connections{app} equals the number of open clients and drops when they leave', async () => {
    const { node } = ctx;
    const clients = [h.pusherClient(node, node.apps.m1), h.pusherClient(node, node.apps.m1), h.pusherClient(node, node.apps.m1)];
    await Promise.all(clients.map((c) => h.connected(c)));
    const other = await h.rawClient(node, node.apps.m2);
    await expectConnections(node, 'm1', 3);
    await expectConnections(node, 'm2', 1);

    clients[0].disconnect();
    clients[1].disconnect();
    await expectConnections(node, 'm1', 1);

    clients[2].disconnect();
    await other.close();
    await expectConnections(node, 'm1', 0);
    await expectConnections(node, 'm2', 0);
  });

  it('a dropped TCP connection is counted out too', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node, node.apps.m1);
    await expectConnections(node, 'm1', 1);
    c.terminate();
    await expectConnections(node, 'm1', 0);
  });

  it('labels never include channel names or socket ids', async () => {
    const { node } = ctx;
    const name = h.uniq('secret-channel-');
    const c = await h.rawClient(node, node.apps.m1);
    await c.subscribe(name);
    await h.sdk(node, node.apps.m1).trigger(name, 'Ev', {});
    await c.next('Ev');
    const { text } = await h.getMetrics(node);
    assert.ok(!text.includes(name), 'channel name leaked into metrics');
    assert.ok(!text.includes(c.socketId), 'socket id leaked into metrics');
    assert.ok(h.metricValue(text, 'belfry_connections_opened_total', { app: 'm1' }) >= 1, 'opened counter');
  });

  it('refused connections are counted by reason', async () => {
    const { node } = ctx;
    const c = new h.RawClient(node.wsUrl('unknown-key'));
    await h.withTimeout(c.closed, 3000, 'refused');
    await h.eventually(async () => {
      const { text } = await h.getMetrics(node);
      return h.metricValue(text, 'belfry_connections_refused_total', { reason: 'unknown_app' }) >= 1;
    }, { message: 'belfry_connections_refused_total{reason="unknown_app"}' });
  });
});
