// node-redis 5 and ioredis 6 as an app uses them, through redcloak: connect
// (their handshakes: CLIENT SETINFO; ioredis also HELLO 3 and INFO), write
// and read a few values. Usage: node handshakes.js PORT node-redis|ioredis.
// Prints "ok".
const assert = require('node:assert');
const [port, which] = [Number(process.argv[2]), process.argv[3]];

async function nodeRedis() {
  const { createClient } = require('redis');
  const client = createClient({ url: `redis://127.0.0.1:${port}` });
  await client.connect();
  for (let i = 0; i < 3; i++) {
    await client.set(`handshake:node-redis:${i}`, `value-${i}`);
    assert.strictEqual(await client.get(`handshake:node-redis:${i}`), `value-${i}`);
  }
  await client.quit();
}

async function ioredis() {
  const Redis = require('ioredis');
  const client = new Redis({ host: '127.0.0.1', port, lazyConnect: true });
  await client.connect();
  for (let i = 0; i < 3; i++) {
    await client.set(`handshake:ioredis:${i}`, `value-${i}`);
    assert.strictEqual(await client.get(`handshake:ioredis:${i}`), `value-${i}`);
  }
  await client.quit();
}

(which === 'ioredis' ? ioredis() : nodeRedis()).then(
  () => console.log('ok'),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
