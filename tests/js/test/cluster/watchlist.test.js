'use strict';
// Watchlists across nodes: online and offline events reach a watcher on
// another node, and a crashed node's users go offline through the
// coordinator's sweep.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 2, coordinator: true, presenceTtl: 3, sweepIntervalMs: 250, apps: [{ id: 'app1' }] },
  'cluster-watchlist');

async function watcher(node, id, watchlist = []) {
  const client = h.pusherClient(node, node.app, { userData: { id, watchlist } });
  const events = [];
  client.user.watchlist.bind('online', (e) => events.push({ name: 'online', ids: e.user_ids }));
  client.user.watchlist.bind('offline', (e) => events.push({ name: 'offline', ids: e.user_ids }));
  await h.connected(client);
  client.signin();
  await h.eventually(() => client.user.user_data && client.user.user_data.id === id, { message: `signin of ${id}` });
  return { client, events };
}

describe('cluster: watchlist', () => {
  it('a user signing in on node B is online for a watcher on node A, and offline after the last tab leaves', async () => {
    const [A, B] = ctx.cluster.nodes;
    const ada = h.uniq('ada-');
    const w = await watcher(A, h.uniq('w-'), [ada]);
    const tab1 = await watcher(B, ada);
    await h.eventually(() => w.events.length === 1, { message: 'online via B' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [ada] });
    const tab2 = await watcher(A, ada);
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
    await watcher(B, bob);
    const w = await watcher(A, h.uniq('w-'), [bob, h.uniq('nobody-')]);
    await h.eventually(() => w.events.length === 1, { message: 'initial online list' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [bob] });
  });
});
