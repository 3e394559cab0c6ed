'use strict';
// A pusher-js client over wss://, run as its own process so that Node trusts the test CA the
// way an application would: through NODE_EXTRA_CA_CERTS, read at process start.
// argv: host port key channel event. Prints one JSON line when subscribed ({"subscribed":
// socket_id}) and one per event received ({"event": name, "data": ...}); exits on stdin EOF.
const Pusher = require('pusher-js');

const [host, port, key, channel, event] = process.argv.slice(2);
const client = new Pusher(key, {
  wsHost: host,
  wssPort: Number(port),
  forceTLS: true,
  enabledTransports: ['ws'],
  disableStats: true,
  cluster: 'mt1',
});
const say = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
client.connection.bind('error', (e) => say({ error: String((e && e.error && e.error.data && e.error.data.message) || (e && e.type) || e) }));
const ch = client.subscribe(channel);
ch.bind('pusher:subscription_succeeded', () => say({ subscribed: client.connection.socket_id }));
ch.bind(event, (data) => say({ event, data }));
process.stdin.on('end', () => { client.disconnect(); process.exit(0); });
process.stdin.resume();
