'use strict';
// Watchlists: a signed-in user hears when the users on its watchlist come
// online and go offline (pusher_internal:watchlist_events), and at signin
// which of them are online already.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'watchlist');

describe('watchlist', () => {
  it('tells a watcher once when a watched user comes online, and not while one of its tabs remains', async () => {
    const node = ctx.node;
    const ada = h.uniq('ada-');
    const bob = h.uniq('bob-');
    const w = await h.watchlistClient(node, h.uniq('w-'), [ada]);
    const tab1 = await h.watchlistClient(node, ada);
    await h.eventually(() => w.events.length === 1, { message: 'online event' });
    assert.deepEqual(w.events[0], { name: 'online', ids: [ada] });
    // A second tab of the same user is not news; another user is not watched.
    await h.watchlistClient(node, ada);
    await h.watchlistClient(node, bob);
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
    const online = await h.watchlistClient(node, ada);
    const w = await h.watchlistClient(node, h.uniq('w-'), [ada, cy]);
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
