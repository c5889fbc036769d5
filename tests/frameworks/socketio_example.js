// The Socket.IO Redis adapter through redcloak: two Socket.IO servers share
// one Redis (pub/sub); a broadcast from the second reaches a client of the
// first.
//
// usage: node socketio_example.js redis://127.0.0.1:PORT
const { createServer } = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const { io: connect } = require("socket.io-client");

const url = process.argv[2];

async function server() {
  const pub = createClient({ url });
  const sub = pub.duplicate();
  pub.on("error", (err) => console.error("redis:", err.message));
  sub.on("error", (err) => console.error("redis:", err.message));
  await Promise.all([pub.connect(), sub.connect()]);
  const http = createServer();
  const io = new Server(http, { adapter: createAdapter(pub, sub) });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  return { io, http, pub, sub, port: http.address().port };
}

async function main() {
  const first = await server();
  const second = await server();
  const client = connect(`http://127.0.0.1:${first.port}`, { transports: ["websocket"] });
  await new Promise((resolve) => first.io.once("connection", resolve));
  const received = new Promise((resolve) => client.once("news", resolve));
  // Until the first server's subscription is live, a broadcast may be lost: repeat it.
  const repeat = setInterval(() => second.io.emit("news", { text: "socketio-broadcast-secret" }), 200);
  const message = await Promise.race([
    received,
    new Promise((_, reject) => setTimeout(() => reject(new Error("no broadcast in 20 s")), 20000)),
  ]);
  clearInterval(repeat);
  const rooms = await second.io.fetchSockets();
  console.log(`received ${message.text} sockets ${rooms.length}`);
  client.close();
  for (const s of [first, second]) {
    s.io.close();
    await Promise.all([s.pub.quit(), s.sub.quit()]);
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
