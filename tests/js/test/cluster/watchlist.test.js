'use strict';
// Watchlists across nodes: online and offline events reach a watcher on
// another node, and a crashed node's users go offline through the
// coordinator's sweep.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 2, coordinator: true, presenceTtl: 3, sweepIntervalMs: 250, apps: [{ id: 'app1' }] },
  'cluster-watchlist');

describe('cluster: watchlist', () => {
  it('a user signing in on node B is online for a watcher on node A, and offline after the last tab leaves', async () => {
    const [A, B] = ctx.cluster.nodes;
    const ada = h.uniq('ada-');
    const w = await h.watchlistClient(A, h.uniq('w-'), [ada]);
    const tab1 = await h.watchlistClient(B, ada);
    await h.eventually(() => w.events.length === 1, { message: 'online via B' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [ada] });
    const tab2 = await h.watchlistClient(A, ada);
    tab1.client.disconnect();
    await h.sleep(400);
    assert.equal(w.events.length, 1, `a tab is still open: ${JSON.stringify(w.events)}`);
    tab2.client.disconnect();
    await h.eventually(() => w.events.length === 2, { message: 'offline after the last tab' });
    assert.deepEqual(w.events[1], { name: 'offline', ids: [ada] });
  });

  it('a watcher signing in on another node hears who is online already', async () => {
    const [A, B] = ctx.cluster.nodes;
    const bob = h.uniq('bob-');
    await h.watchlistClient(B, bob);
    const w = await h.watchlistClient(A, h.uniq('w-'), [bob, h.uniq('nobody-')]);
    await h.eventually(() => w.events.length === 1, { message: 'initial online list' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [bob] });
  });
});
