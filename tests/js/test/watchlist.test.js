'use strict';
// Watchlists: a signed-in user hears when the users on its watchlist come
// online and go offline (pusher_internal:watchlist_events), and at signin
// which of them are online already.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'watchlist');

/** pusher-js client signed in as `id`, recording its watchlist events. */
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

describe('watchlist', () => {
  it('tells a watcher when a watched user comes online and goes offline, once per user', async () => {
    const node = ctx.node;
    const ada = h.uniq('ada-');
    const bob = h.uniq('bob-');
    const w = await watcher(node, h.uniq('w-'), [ada]);
    const tab1 = await watcher(node, ada);
    await h.eventually(() => w.events.length === 1, { message: 'online event' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [ada] });
    // A second tab of the same user is not news; another user is not watched.
    await watcher(node, ada);
    await watcher(node, bob);
    await h.sleep(300);
    assert.equal(w.events.length, 1, JSON.stringify(w.events));
    tab1.client.disconnect();
    await h.sleep(300);
    assert.equal(w.events.length, 1, 'still online through the second tab');
  });

  it('lists the watched users already online at signin, and reports them offline when they leave', async () => {
    const node = ctx.node;
    const ada = h.uniq('ada-');
    const cy = h.uniq('cy-');
    const online = await watcher(node, ada);
    const w = await watcher(node, h.uniq('w-'), [ada, cy]);
    await h.eventually(() => w.events.length === 1, { message: 'initial online list' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [ada] });
    online.client.disconnect();
    await h.eventually(() => w.events.length === 2, { message: 'offline event' });
    assert.deepEqual(w.events[1], { name: 'offline', ids: [ada] });
  });

  it('refuses a watchlist of more than 100 users with 4302', async () => {
    const node = ctx.node;
    const c = await h.rawClient(node);
    const ids = Array.from({ length: 101 }, (_, i) => `u${i}`);
    c.send({ event: 'pusher:signin', data: h.rawSignin(node.app, c.socketId, { id: 'big', watchlist: ids }) });
    const err = await c.next((f) => f.event === 'pusher:error', 3000, 'watchlist error');
    assert.equal(err.data.code, 4302);
  });
});
